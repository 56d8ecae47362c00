"""A mini WithAnyone trained end to end on CPU: synthetic people, a stand-in face model, a tiny FLUX."""
