"""A separate process that writes corrections and prints each id once the call returned.

Run by the durability and multi-process tests: `python store_writer.py DB USER_ID COUNT`
(COUNT 0: until killed). A printed id is an acknowledged, committed correction.
"""

from __future__ import annotations

import asyncio
import sys

from storage.store import Store


async def main(path: str, user_id: int, count: int) -> None:
    async with Store(path) as store:
        print("ready", flush=True)
        index = 0
        while count == 0 or index < count:
            made = await store.add_correction(
                user_id, None, "old", f"new {index}", [{"role": "user", "content": "q"}]
            )
            print(made.id, flush=True)
            index += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
