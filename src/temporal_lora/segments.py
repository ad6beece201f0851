"""Segment routing, kept at its documented import path; it lives in `temporal_lora.routing.segments`."""

from temporal_lora.routing.segments import (
    HysteresisState,
    Segment,
    SegmentConfig,
    SegmentRouter,
    generate_segmented,
    split_spans,
    token_spans,
)

__all__ = ["HysteresisState", "Segment", "SegmentConfig", "SegmentRouter", "generate_segmented", "split_spans",
           "token_spans"]
