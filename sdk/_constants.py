"""SDK-side numbers, each in one place."""

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
DEFAULT_MODEL = "builtin:tiny-sd"
DEFAULT_UPSCALER = "builtin:tiny-sd-x4-upscaler"
DEFAULT_INPAINTER = "builtin:tiny-sd-inpaint"

# A 4K PNG is tens of MB, far over gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MESSAGE_SIZE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
# An event stream can carry nothing for minutes while a batch renders, and NATs
# and load balancers drop idle connections without a word: pings keep it open,
# and one unanswered for the timeout shows the farm is gone, so the stream resumes.
KEEPALIVE_TIME_S = 20
KEEPALIVE_TIMEOUT_S = 10
CHANNEL_OPTIONS = MESSAGE_SIZE_OPTIONS + (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    # Between calls too: a client's next call should not meet a connection that died meanwhile.
    ("grpc.keepalive_permit_without_calls", 1),
    # By default only 2 pings go out while no data does; a quiet stream needs them all.
    ("grpc.http2.max_pings_without_data", 0),
)

# Unary calls are bookkeeping on the scheduler; anything slower is a dead farm.
# Client(timeout=...) overrides it.
UNARY_TIMEOUT_S = 30.0
# A client's first call waits this long (or its timeout, if shorter) for a connection, e.g. to a farm that
# is starting, before it says the farm cannot be reached. Once connected, calls wait for a restarting farm
# up to their timeout.
CONNECT_TIMEOUT_S = 5.0

# The most jobs one ListJobs reply holds (the farm's limit).
MAX_LIST_PAGE = 1000

# Unary calls answered UNAVAILABLE are retried this many times by default (gRPC allows at most 4: five
# attempts), backing off from the first delay (jittered, doubling) up to the cap.
DEFAULT_MAX_RETRIES = 4
MAX_RETRIES = 4
RETRY_FIRST_BACKOFF_S = 0.5
RETRY_MAX_BACKOFF_S = 5.0

# A dropped event stream is resumed from the last sequence number seen, backing
# off from the first delay up to the cap, for at most the total window.
RECONNECT_FIRST_DELAY_S = 0.2
RECONNECT_MAX_DELAY_S = 5.0
RECONNECT_WINDOW_S = 120.0

# Trailing metadata key naming the request field an INVALID_ARGUMENT is about.
FIELD_METADATA_KEY = "renderfarm-field"

# Call metadata carrying the caller's API token: `authorization: Bearer TOKEN`.
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "

# Fetching one result's PNG from an object store by its presigned URL.
FETCH_TIMEOUT_S = 60.0
