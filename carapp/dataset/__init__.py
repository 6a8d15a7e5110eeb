"""The photos and their labels: reading images safely, indexing a dataset tree (CompCars or class-per-folder), the
class filter and split, the input pipeline (transforms, loaders, a pre-resized cache), dataset health, demo data."""
