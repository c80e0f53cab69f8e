"""`python -m schema` rewrites schema/schema.graphql from the code."""

from schema import SDL_PATH, sdl

SDL_PATH.write_text(sdl())
print(f"wrote {SDL_PATH}")
