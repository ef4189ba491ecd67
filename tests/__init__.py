import os

# The apps and servers the tests start serve no gRPC unless a test asks for it
# on a free port: the default, 8001, is shared by everything on this machine.
os.environ.setdefault("LOSS_SERVICE_GRPC_PORT", "0")
