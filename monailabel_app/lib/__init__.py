"""AdaCS MONAI Label app library: the label-propagation infer task."""
