"""A completed job's record leaves out what it restates and gives it back when read
(gateway/jobs/model.py: compact_metadata, expand_metadata)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.jobs.model import Job, compact_metadata, expand_metadata

small = st.integers(min_value=0, max_value=2**31)
values = st.one_of(st.none(), st.booleans(), small, st.text(max_size=8))


@st.composite
def ended(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record as a job ends and the metadata its worker made, often restating it."""
    seed, width, height = draw(small), draw(small), draw(small)
    urls = draw(st.lists(st.just("u"), min_size=1, max_size=3))
    created = draw(st.integers(min_value=1, max_value=2**41))
    completed = created + draw(st.integers(min_value=0, max_value=10**6))
    record = {
        "params": {
            "prompt": draw(st.text(max_size=20)),
            "seed": draw(st.sampled_from([seed, None])),
        },
        "width": width,
        "height": height,
        "urls": urls,
        "created_at": created,
        "completed_at": completed,
        "attempts": draw(st.integers(min_value=1, max_value=3)),
    }
    restated = {
        "width": width,
        "height": height,
        "seed": seed,
        "seeds": [seed] * len(urls),
        "cached": False,
        "duration": round((completed - created) / 1000, 3),
        "attempts": record["attempts"],
        "sent": {
            "prompt": record["params"]["prompt"],
            "width": width,
            "height": height,
            "seed": seed,
            "format": "png",
        },
    }
    metadata = {k: v for k, v in restated.items() if draw(st.booleans())}
    metadata.update(draw(st.dictionaries(st.sampled_from([*restated, "model", "x"]), values)))
    return record, metadata


@given(ended())
def test_the_metadata_read_is_the_metadata_written(
    case: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    record, metadata = case
    meta = compact_metadata(metadata, record)
    if meta is not None:
        assert expand_metadata(meta, record) == metadata


def test_what_a_worker_writes_is_left_out_and_read_back() -> None:
    record = {
        "id": "j1",
        "account": "a1",
        "status": "completed",
        "provider": "local",
        "params": {"prompt": "a fox", "seed": 5, "width": 768, "height": 512},
        "created_at": 1_000,
        "completed_at": 1_250,
        "attempts": 1,
        "urls": ["https://x.test/1.png"],
    }
    metadata = {
        "model": "local-preview",
        "sent": {"prompt": "a fox", "width": 768, "height": 512, "seed": 5, "format": "png"},
        "width": 768,
        "height": 512,
        "seed": 5,
        "seeds": [5],
        "backend": "local",
        "cached": False,
        "duration": 0.25,
        "attempts": 1,
    }
    meta = compact_metadata(metadata, {**record, "width": 768, "height": 512})
    assert meta == {"model": "local-preview", "sent": {"format": "png"}, "backend": "local"}
    job = Job.from_record({**record, "meta": meta})  # its size: the one asked for
    assert (job.width, job.height, job.metadata) == (768, 512, metadata)
    assert job.params["num_images"] == 1 and job.params["output_format"] == "png"  # defaults
    # What was sent without the prompt, the size and the seed is kept whole.
    other = {**metadata, "sent": {"prompt": "a fox", "aspect_ratio": "3:2"}}
    assert compact_metadata(other, {**record, "width": 768, "height": 512}) == {
        "model": "local-preview",
        "sent": {"prompt": "a fox", "aspect_ratio": "3:2"},
        "backend": "local",
    }
