"""Serves the files of a directory over HTTPS with Python's own http.server and ssl (a bundle
endpoint nobody here wrote, whose documents the test rewrites between fetches).

usage: https_files.py DIR PORT CERT KEY
"""

import functools
import http.server
import ssl
import sys


def main() -> None:
    directory, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
