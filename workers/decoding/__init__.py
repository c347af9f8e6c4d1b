"""CTC decoding: greedy and beam search with a lexicon and an n-gram LM, and the streaming decoder stage."""
