"""latentd.v1: the generated Python code of protos/latentd/v1/latentd.proto (`make protos`)."""
