"""Python clients of a wanserve endpoint: over HTTP (sync and asyncio) and over a Serve handle.

    client = WanClient("http://127.0.0.1:8000", token=None)
    job = client.generate("a red fox running through snow", size="832x480", num_frames=81)
    job.wait(progress=True); job.save("fox.mp4")     # tqdm bar; raises JobFailed / JobCancelled

    with client.session(prompt="a paper boat on a river", seed=7) as s:   # CausVid
        blocks = list(s.next_fragment().blocks())  # (index, mp4) of each block as soon as it is decoded

`AsyncWanClient` is the same over aiohttp (`await job.wait()`); inside Ray, `HandleClient(serve.get_app_handle(
"wanserve"))` / `AsyncHandleClient` give the same Job and Session over the router's handle. Every error is a
`WanError` with the server's status, code and message. More: deployments/README.md, "Clients".
"""
from .core import Job, JobCancelled, JobFailed, Session, WanError
from .handle import AsyncHandleClient, HandleClient
from .http import AsyncWanClient, WanClient

__all__ = ["AsyncHandleClient", "AsyncWanClient", "HandleClient", "Job", "JobCancelled", "JobFailed", "Session",
           "WanClient", "WanError"]
