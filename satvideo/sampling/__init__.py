"""Sampling beside the engine: what to sample (inputs), where it goes (outputs), adapters at sampling time."""

from satvideo.sampling.adapters import add_lora_from_checkpoint, adapter_list, merge_adapters
from satvideo.sampling.inputs import (VideoPlan, VideoRequest, interactive_prompts, latent_frame_count, read_prompts,
                                      read_requests, request_from_line, sampling_dtype, size_from_image,
                                      warn_of_long_prompts)
from satvideo.sampling.outputs import (MANIFEST_NAME, OutputWriter, contact_sheet, file_sha256, save_video, slugify, to_uint8,
                                       write_manifest_line)

__all__ = ["MANIFEST_NAME", "OutputWriter", "VideoPlan", "VideoRequest", "adapter_list", "add_lora_from_checkpoint", "contact_sheet",
           "file_sha256", "interactive_prompts", "latent_frame_count", "merge_adapters", "read_prompts",
           "read_requests", "request_from_line", "sampling_dtype", "save_video", "size_from_image", "slugify",
           "to_uint8", "warn_of_long_prompts", "write_manifest_line"]
