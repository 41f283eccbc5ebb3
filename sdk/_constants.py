"""SDK-side numbers, each in one place."""

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_MODEL = "builtin:tiny-sd"
DEFAULT_UPSCALER = "builtin:tiny-sd-x4-upscaler"

# A 4K PNG is tens of MB, far over gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# Unary calls are bookkeeping on the scheduler; anything slower is a dead farm.
UNARY_TIMEOUT_S = 30.0

# A dropped event stream is resumed from the last sequence number seen, backing
# off from the first delay up to the cap, for at most the total window.
RECONNECT_FIRST_DELAY_S = 0.2
RECONNECT_MAX_DELAY_S = 5.0
RECONNECT_WINDOW_S = 120.0

# Trailing metadata key naming the request field an INVALID_ARGUMENT is about.
FIELD_METADATA_KEY = "renderfarm-field"
