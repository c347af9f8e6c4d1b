"""The BiLSTM-CTC acoustic model, its config, the token inventory and the model bundle."""
