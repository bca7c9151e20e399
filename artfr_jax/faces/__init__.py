"""Whole-photo face pipeline on the host (NumPy/OpenCV/dlib, no JAX).

``detection``: faces and landmarks (dlib HOG or mmod + 5/68-point shape predictors);
``align``: similarity transforms to the FFHQ-style crop template and the crop warp;
``paste``: soft-masked paste-back of restored crops and optional colour transfer;
``video``: face tracking across frames.
The restoration CLI (``artfr_jax/restore.py``) chains them: detect, align every face of a photo,
restore them in one batch, paste back.
"""
