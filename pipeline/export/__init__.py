"""Build-time tools: the trained head as files a device runs without Python -- C (the head,
and the whole edge step after it) or ONNX -- and the int8 weight tables the C export can
carry. Nothing here runs on the edge at serve time; the CLI's `export` calls it.

    export_c.py       the head and exit as one C99 file pair (float32 or int8 tables)
    export_edge.py    the edge step after the head in C: edge_step.c, plus this model's headers
    edge_step.c       the hand-written C edge step (it #includes pipeline/floor/coder.c)
    export_onnx.py    the head and exit as an ONNX graph
    int8_weights.py   int8 weight tables, rounded so errors cancel on calibration frames
    c_literals.py     C literals for the generated tables
"""
