"""Chat front ends over one platform-neutral service.

`bot.service.ChatService` holds every behaviour (history, corrections, permissions, rate
limits); `bot.console`, `bot.telegram`, `bot.discord_bot` and `bot.http_api` only translate
platform events. `bot.text` and `bot.streaming` are the helpers adapters share.
"""
