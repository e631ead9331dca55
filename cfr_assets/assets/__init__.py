"""One module per stage group: shots, training stages, evaluation and deployment."""
