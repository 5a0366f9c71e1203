"""Models: MLP and Hugging Face sequence classifiers, weight exchange, save/load."""
