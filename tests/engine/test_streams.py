"""RequestStream between the engine's loop thread and a reader's event loop (engine/streams.py):
outputs merged on the engine's thread, the reader woken only when its stream is ready. No model:
a thread plays the engine's loop, delivering outputs as `AsyncEngine._deliver` does."""

import asyncio
import threading
import time

from engine.request import RequestOutput
from engine.streams import RequestStream, post, wake_all


class _Engine:
    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


def _engine_thread(stream, loop, n, gap, posts, after_reader_waits=False):
    """Deliver n outputs `gap` seconds apart from another thread; count the reader's wake-ups.
    `after_reader_waits`: the first only once the reader waits (on a loaded box the thread could
    otherwise deliver it before the reader's loop first runs, and nobody would be woken for it)."""

    def run():
        deadline = time.monotonic() + 10
        while after_reader_waits and not stream._waiting and time.monotonic() < deadline:
            time.sleep(0.0005)
        for i in range(n):
            time.sleep(gap)
            out = RequestOutput("r", f"{i},", [i], finish_reason="length" if i == n - 1 else None)
            if stream.deliver(out):
                posts.append(i)
                post(loop, wake_all, [stream])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_reader_in_its_window_is_woken_once_per_window_not_once_per_step():
    async def go():
        loop = asyncio.get_running_loop()
        stream, posts, reads = RequestStream(_Engine(), "r", [1]), [], []
        started = time.monotonic()
        thread = _engine_thread(stream, loop, 40, 0.002, posts, after_reader_waits=True)
        not_before = 0.0
        while True:
            try:
                out = await stream.next_output(not_before)
            except StopAsyncIteration:
                break
            reads.append(out.token_ids)
            not_before = time.monotonic() + 0.03
        thread.join()
        return posts, reads, time.monotonic() - started

    posts, reads, took_s = asyncio.run(go())
    assert [t for ids in reads for t in ids] == list(range(40)), "every token once, in order"
    # one read per 30 ms window (40 steps 2 ms apart take >= 80 ms; longer on a loaded box), plus
    # the first token's and the last output's
    assert reads[0] == [0] and len(reads) <= took_s / 0.03 + 2, (len(reads), took_s)
    # the engine's thread wakes the reader for the first token (no window yet) and the last output
    # if the reader waits for it, and past a window only when the reader's timer found nothing;
    # the steps in between it merges, and a reader that was not waiting is woken by nobody
    assert posts[0] == 0 and len(posts) <= len(reads), (posts, len(reads))


def test_a_reader_without_a_window_gets_every_step_and_an_error_after_the_output_before_it():
    async def go():
        loop = asyncio.get_running_loop()
        stream, posts = RequestStream(_Engine(), "r", [1]), []
        thread = _engine_thread(stream, loop, 5, 0.005, posts)
        got = [out.token_ids async for out in stream]
        thread.join()
        failing = RequestStream(_Engine(), "f", [1])
        failing.put(RequestOutput("f", "a", [7]))
        failing.put(ValueError("boom"))
        first = await failing.next_output()
        try:
            await failing.next_output()
        except ValueError as exc:
            return got, posts, first.token_ids, str(exc)

    got, posts, first, error = asyncio.run(go())
    # each step's output as it comes (merged only while the reader was busy with the one before)
    assert [t for ids in got for t in ids] == [0, 1, 2, 3, 4] and 1 <= len(posts) <= len(got)
    assert first == [7] and error == "boom"


def test_cancelling_a_waiting_reader_aborts_and_a_later_delivery_wakes_nobody():
    async def go():
        engine = _Engine()
        stream = RequestStream(engine, "r", [1])
        task = asyncio.ensure_future(stream.next_output(time.monotonic() + 5))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return engine.aborted, stream.deliver(RequestOutput("r", "x", [1], finish_reason="stop"))

    aborted, woke = asyncio.run(go())
    assert aborted == ["r"] and woke is False


def test_output_merged_inside_the_window_goes_when_it_ends_though_no_step_follows():
    """A row that stops producing for a while (preempted, or waiting behind a long prefill) after a
    step inside its reader's window: the reader's timer sends what was merged when the window
    ends, not when the row's next output comes."""

    async def go():
        loop = asyncio.get_running_loop()
        stream, posts = RequestStream(_Engine(), "r", [1]), []
        first = await asyncio.gather(stream.next_output(), _later(loop, stream, 0.0, [0], posts))
        not_before = time.monotonic() + 0.05
        reader = asyncio.ensure_future(stream.next_output(not_before))
        await _later(loop, stream, 0.01, [1], posts)  # inside the window; then nothing for 1 s
        late = asyncio.ensure_future(_later(loop, stream, 1.0, [2], posts, finish="length"))
        out = await asyncio.wait_for(reader, 5)
        got_at = time.monotonic()
        await late
        return first[0].token_ids, out.token_ids, got_at - not_before, posts

    first, second, after_window_s, posts = asyncio.run(go())
    assert first == [0] and second == [1]
    assert 0 <= after_window_s < 0.5, after_window_s  # at the window's end, not the next output's
    assert posts == [0], posts  # the timer woke it, not the engine's thread


async def _later(loop, stream, delay, ids, posts, finish=None):
    """After `delay`, deliver `ids` from another thread as the engine's loop would."""
    await asyncio.sleep(delay)

    def run():
        if stream.deliver(RequestOutput("r", "x", ids, finish_reason=finish)):
            posts.append(ids[0])
            post(loop, wake_all, [stream])

    thread = threading.Thread(target=run)
    thread.start()
    await asyncio.to_thread(thread.join)
