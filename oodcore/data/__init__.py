"""Image folders, image loading, protocols, ImageNet classes and the ID/OOD splits."""
