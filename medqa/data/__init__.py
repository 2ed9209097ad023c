"""The data: PubMedQA read from the hub or a local copy (every file of it, checked against the others),
validated, and split into train/validation/test with the size caps."""
