"""Constants shared by training, evaluation and serving.

The values are part of the on-disk and wire formats of the original PALO/LLaVA code, so they must not change.
"""

IGNORE_INDEX = -100
# A sentinel in ``input_ids`` marking where one image's features are spliced in; never a vocabulary id.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

CONTROLLER_HEART_BEAT_EXPIRATION = 30  # seconds
WORKER_HEART_BEAT_INTERVAL = 15  # seconds
LOGDIR = "."

# OpenAI's range for one token's logit bias (-100 bans a token, 100 all but forces it): the engine's and the API's.
MAX_LOGIT_BIAS = 100.0

# Image URLs fetched (only with --allow-remote-images; palo.remote_images) rather than read as base64 or a path.
REMOTE_URL_SCHEMES = ("http://", "https://")

# Seeds: the API takes a 64-bit signed integer (OpenAI's and vLLM's range); a worker takes all that torch's
# generators take, so that the API's answer i of n, seeded with ``seed + i``, fits.
SEED_RANGE = (-(2**63), 2**63 - 1)
WORKER_SEED_RANGE = (-(2**63), 2**64 - 1)
