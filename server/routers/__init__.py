"""The HTTP routes, one module per resource, with their FastAPI dependencies (`deps`) and the
streaming reader of admin upload bodies (`upload`)."""
