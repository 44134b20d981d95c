# N concurrent CONNECTs through the proxy to registry.test:PORT; prints the statuses.
import asyncio, sys, collections
proxy_host, proxy_port, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
async def up():
    held = []
    async def keep(r, w): held.append(w)
    return await asyncio.start_server(keep, "127.0.0.1", port, backlog=1024)
async def one():
    try:
        r, w = await asyncio.open_connection(proxy_host, proxy_port)
        w.write(f"CONNECT registry.test:{port} HTTP/1.1\r\nHost: registry.test:{port}\r\n\r\n".encode())
        line = await asyncio.wait_for(r.readline(), 60)
        return line.split()[1].decode() if line else "eof"
    except Exception as e:
        return type(e).__name__
async def main():
    server = await up()
    results = await asyncio.gather(*[one() for _ in range(n)])
    print(dict(collections.Counter(results)))
asyncio.run(main())
