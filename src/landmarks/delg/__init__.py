"""DELG itself: the network (model), its offline ImageNet weights, export in the official signature, training and label-free adaptation of the local head."""
