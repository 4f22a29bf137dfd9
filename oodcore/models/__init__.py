"""The model registry: timm, torchvision and offline families, their preprocessing and weights."""
