"""carapp: car make/model classification with ResNet and focal loss (CompCars), as a CLI, a Python API and an app.

Importing the package is cheap; torch and friends load with the submodules that need them.
"""
__version__ = "0.1.0"
