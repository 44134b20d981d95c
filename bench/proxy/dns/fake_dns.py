# A fake DNS server on 127.0.0.1:53: answers A with 127.0.0.1 (after 200 ms), anything
# else with no record; writes the number of queries received to the file argv[1]. With a
# capacity argv[2] > 0, a query arriving while that many are being answered is dropped,
# as a plain resolver under load drops them.
import socket, struct, sys, threading, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 53))
capacity = int(sys.argv[2]) if len(sys.argv) > 2 else 0
count = 0
busy = 0
lock = threading.Lock()
def answer(data, peer):
    global busy
    time.sleep(0.2)
    qid, flags, qd = struct.unpack(">HHH", data[:6])
    i = 12
    while data[i] != 0: i += data[i] + 1
    qtype = struct.unpack(">H", data[i+1:i+3])[0]
    question = data[12:i+5]
    an = 1 if qtype == 1 else 0
    resp = struct.pack(">HHHHHH", qid, 0x8180, 1, an, 0, 0) + question
    if an: resp += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
    s.sendto(resp, peer)
    with lock: busy -= 1
def report():
    while True:
        time.sleep(0.5)
        with lock: open(sys.argv[1], "w").write(str(count))
threading.Thread(target=report, daemon=True).start()
while True:
    data, peer = s.recvfrom(512)
    with lock:
        count += 1
        if capacity and busy >= capacity: continue
        busy += 1
    threading.Thread(target=answer, args=(data, peer)).start()
