"""The interpreters: PyHealth's classes as drop-ins (gradient, attention and perturbation methods) and
the feature protocol, length groups and padding checks they share."""
