"""The torch-free floor: what the model (training, torch), the edge (NumPy only) and the
workers all use, so that none of them has to import another for it. Only NumPy and the
standard library here (the image-folder reader also OpenCV, imported when used); the
layering contracts in pyproject.toml (`lint-imports`) keep torch and the packages above out.

    scores.py        the exit's confidence scores: the one definition training and edges share
    splits.py        Split, Dataset and the validation split's size
    data.py          data sets from disk: Fashion-MNIST's IDX files, or an image folder
    image_folder.py  the user's own pictures, one folder per class
"""
