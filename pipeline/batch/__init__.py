"""`asr transcribe`: the batch job on Ray Data, its inputs and outputs."""
