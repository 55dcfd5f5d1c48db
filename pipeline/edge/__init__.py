"""The edge: frame sources, the in-flight table that gives every frame one answer, and the
producer that runs the head and carries requests and answers to and from the broker."""
