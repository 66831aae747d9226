"""Hand-assembled protobuf wire format of the hot paths, checked against the protobuf runtime."""
