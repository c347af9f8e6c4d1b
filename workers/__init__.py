"""The four recognition stages as plain Python classes (ingest, MFCC, BiLSTM-CTC, CTC decoder).

This package never imports ``ray`` or ``pipeline``; the Ray wiring lives in ``pipeline``.
"""
