"""A tiny WSGI app for gunicorn, with nothing deployfs-specific in it."""


def app(environ, start_response):
    body = f"hello from {environ.get('HTTP_X_FORWARDED_FOR')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
