"""The torch-free floor: what the model (training, torch), the edge (NumPy only), protocol
and the workers all use, so that none of them has to import another for it. Only NumPy and
the standard library here (the image readers also OpenCV, imported when used; native.py the
system's C compiler, when there is one); the layering contracts in pyproject.toml
(`lint-imports`) keep torch and every package above out.

    frames.py         the one conversion from a picture to the pixels a model reads
    data.py           data sets from disk: Fashion-MNIST's IDX files, or an image folder
    image_folder.py   the user's own pictures, one folder per class
    splits.py         Split, Dataset and the validation split's size
    scores.py         the exit's confidence scores: the one definition training and edges share
    edge_artifact.py  the edge artifact's format (edge.npz), written by training, read by edges
    quantization.py   uplink quantization: the dtypes the wire carries features in
    static_code.py    the per-model entropy code (Huffman and rANS), its Python reference
    code_tables.py    the tables a static code builds from its frequencies
    native.py         C sources built on first use: coder.c (the static code's coders)
"""
