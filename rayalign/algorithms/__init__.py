"""Pure maths of the RL algorithms: tensors in, tensors out. No Ray, no I/O, no config objects.

Shapes: B = sequences in the batch, T = response tokens (right-padded); ``mask`` is (B, T) with 1 on real tokens.
"""
