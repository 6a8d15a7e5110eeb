"""Finding each car in a photo: a torchvision detector (trained on the dataset's own boxes, or COCO's)."""
