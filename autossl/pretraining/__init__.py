"""Self-supervised pre-training of the planned CNN's encoder on every image of a dataset
(``autossl_pretrain``); the checkpoint starts any trainer through ``-pretrained_weights``."""
