"""mol_props: molecular property prediction from SMILES."""
