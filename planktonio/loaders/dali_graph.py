"""DALI pieces the backends share: the one decode step of a graph, and handing a pipeline's outputs to torch.

Two backends decode with DALI (dali-gpu/dali-cpu every batch, the cache
once); the decoder they pick, and how the mixed decoder's memory is sized,
is decided here only. DALI is imported inside the functions, so that
`import planktonio` stays light and DALI's start-up is paid by runs that use it.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

# The largest side the hints size the decoder for: one large photograph among plankton ROIs must not size
# every thread's buffers (and a hardware decoder's, batch x width x height); a larger image reallocates.
HINT_SIDE = 1024


def decoder_hints(widths: np.ndarray, heights: np.ndarray) -> dict:
    """Preallocation for the mixed decoder, sized for the largest image it will see, up to HINT_SIDE a side.

    Without it nvJPEG's buffers grow batch by batch to a high-water mark. DALI's
    ResNet-50 example reserves 211 MB of device and 2 x 140 MB of pinned host
    memory per thread for ImageNet's largest images; a 255 x 255 plankton image
    is 195 KB decoded. The paddings are per thread, so this keeps a 16-thread
    process at a few MB instead of about 3.4 GB of GPU memory. Twice the
    largest image leaves room for nvJPEG's row pitch and alignment. An image
    beyond HINT_SIDE grows the buffers of the thread that decodes it, when it
    comes, not of every thread from the start.
    """
    width = min(int(widths.max()), HINT_SIDE) if len(widths) else 0
    height = min(int(heights.max()), HINT_SIDE) if len(heights) else 0
    largest = int(np.minimum(widths.astype(np.int64) * heights, HINT_SIDE * HINT_SIDE).max()) * 3 if len(widths) \
        else 0
    padding = max(2 * largest, 1 << 20)
    return {
        "device_memory_padding": padding,
        "host_memory_padding": padding,
        "preallocate_width_hint": width,
        "preallocate_height_hint": height,
    }


def decode(encoded, widths: np.ndarray, heights: np.ndarray, on_gpu: bool, box=None):
    """The decode step of a DALI graph: uint8 H x W x 3 RGB, EXIF orientation applied.

    on_gpu: DALI's "mixed" decoder (nvJPEG on the GPU, and the hardware JPEG
    decoder on A100/H100/H200; its memory sized by decoder_hints), else the
    CPU decoder. box: (anchors, shapes), each image's (x, y) and (width,
    height) in source pixels: decode only that region (fn.decoders.image_slice).
    widths, heights: the sizes of the images it will decode (for the hints).
    """
    from nvidia.dali import fn, types

    device = "mixed" if on_gpu else "cpu"
    hints = decoder_hints(widths, heights) if on_gpu else {}
    if box is None:
        return fn.decoders.image(encoded, device=device, output_type=types.RGB, **hints)
    anchors, shapes = box
    return fn.decoders.image_slice(encoded, anchors, shapes, axis_names="WH", device=device,
                                   output_type=types.RGB, **hints)


def device_id(device: torch.device) -> int | None:
    """DALI's device_id for a torch device: its index on cuda (cuda means the current one), None on a CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


class PipelineOutputs:
    """A built pipeline's batches as torch tensors, without making the host wait for the GPU.

    DALI's own DALIGenericIterator asks for outputs without a stream
    (pipeline.py: "None ... means that the outputs are synchronized with the
    host"), so the host waits for DALI's stream every batch and the GPU idles
    between steps. Here the outputs are bound to torch's current stream on
    the device instead (`share_outputs(cuda_stream)`, DALI's default executor):
    torch's stream waits for DALI's work on the GPU, the host goes on.

    With that executor the output buffers are shared with the tensors made
    from them (torch.from_dlpack; `release_outputs` does not invalidate them).
    When such a tensor is freed, DALI may reuse its memory in its own stream's
    order, which knows nothing of torch's queued kernels; so each batch's
    tensors are also held here until an event recorded on torch's stream
    after the batch was consumed has completed (checked without waiting).
    """

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device
        self.started = False
        self._held: deque[tuple[torch.cuda.Event, tuple]] = deque()  # (consumed, tensors), oldest first
        self._last: tuple | None = None

    def next(self) -> tuple[torch.Tensor, ...]:
        """The next batch's outputs; DALI prepares the ones after it meanwhile (its prefetch queue)."""
        self._release_consumed()
        if not self.started:
            self.pipe.schedule_run()  # fills the prefetch queue
            self.started = True
        on_gpu = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        outputs = self.pipe.share_outputs(cuda_stream=stream) if on_gpu else self.pipe.share_outputs()
        tensors = tuple(torch.from_dlpack(out.as_tensor()) for out in outputs)
        self.pipe.release_outputs()
        self.pipe.schedule_run()
        self._last = tensors if on_gpu else None
        return tensors

    def _release_consumed(self) -> None:
        """Called when the consumer asks for the next batch: the previous one's work is queued."""
        if self._last is not None:
            consumed = torch.cuda.Event()
            consumed.record(torch.cuda.current_stream(self.device))
            self._held.append((consumed, self._last))
            self._last = None
        while self._held and self._held[0][0].query():
            self._held.popleft()

    def close(self) -> None:
        """Let go of the pipeline and the batches held, once torch's work queued on them is done.

        Dropped unwaited, a held batch's memory goes back to DALI's pool in DALI's stream order
        (AllocBuffer frees on the stream it allocated on), so the next DALI allocation (this pipeline's
        last runs, or the next pipeline, which may get the same stream from DALI's pool) may overwrite it
        while torch's kernels that read it are still queued. One host wait, at close only.
        """
        self._release_consumed()  # marks the last batch handed out, if any
        for consumed, _ in self._held:
            consumed.synchronize()  # cudaEventSynchronize; immediate for those already complete
        self._held.clear()
        self.pipe = None
