"""medvq: a VQ-VAE latent space of MedMNIST images, trained, tuned and encoded with Ray."""
