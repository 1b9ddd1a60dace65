using System.Buffers.Binary;
using System.Net.Sockets;
using BenchmarkDotNet.Attributes;
using QcowTier.Nbd;

namespace QcowTier.Benchmarks;

/// <summary>
/// The NBD server in process: the fixture's qcow2 image served read-only over a Unix socket to a minimal
/// pipelining client (simple replies, <see cref="Depth"/> requests in flight), 4 KiB random and 64 KiB
/// sequential reads. Measures the server's whole request path (parse, read, reply, socket) plus the
/// client's share; scripts/bench-nbd.sh compares against qemu-nbd with real clients.
/// </summary>
[MemoryDiagnoser]
[BenchmarkCategory("Nbd")]
public class NbdReads
{
    private const int Ops = 256;
    private const int Depth = 16;

    private QcowImage _img = null!;
    private NbdServer _server = null!;
    private Socket _client = null!;
    private string _dir = null!;
    private long[] _offsets = null!;
    private byte[] _requests = null!;
    private byte[] _reply = null!;
    private long _size;
    private int _next;

    [Params(4096, 65536)]
    public int Block { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var f = BenchFixture.Shared;
        _size = f.SizeBytes;
        _img = QcowImage.Open(f.QcowPath, new QcowOpenOptions { ReadOnly = true, ForceShare = true });
        _dir = Directory.CreateTempSubdirectory("qcowtier-nbd-bench").FullName;
        var socket = Path.Combine(_dir, "s.sock");
        _server = new NbdServer([new NbdExport("", _img)], new NbdServerOptions { UnixSocketPath = socket });
        _server.Start();
        _client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _client.Connect(new UnixDomainSocketEndPoint(socket));
        Handshake();
        _offsets = BenchFixture.RandomOffsets(f.SizeBytes, Block, 1 << 12, 17);
        _requests = new byte[28 * Depth];
        _reply = new byte[16 + Block];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _client.Dispose();
        _server.StopAsync().GetAwaiter().GetResult();
        _img.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    /// <summary>4 KiB at random aligned offsets (Block 4096) or 64 KiB in order (Block 65536), Depth in flight.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public long Read()
    {
        var sequential = Block >= 65536;
        long total = 0;
        var sent = 0;
        var received = 0;
        while (received < Ops)
        {
            // Top the window up in one send, as a pipelining client does.
            var batch = 0;
            while (sent < Ops && sent - received < Depth)
            {
                long offset;
                if (sequential)
                {
                    offset = (long)_next * Block % _size;
                }
                else
                {
                    offset = _offsets[_next & (_offsets.Length - 1)];
                }
                _next++;
                WriteRequest(_requests.AsSpan(28 * batch), (ulong)sent, offset, Block);
                batch++;
                sent++;
            }
            if (batch > 0)
            {
                _client.Send(_requests.AsSpan(0, 28 * batch));
            }
            ReceiveExact(_reply);
            if (BinaryPrimitives.ReadUInt32BigEndian(_reply.AsSpan(4)) != 0)
            {
                throw new InvalidOperationException("read failed");
            }
            total += _reply[16];
            received++;
        }
        return total;
    }

    private static void WriteRequest(Span<byte> h, ulong cookie, long offset, int length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(h, 0x25609513);
        BinaryPrimitives.WriteUInt16BigEndian(h[4..], 0);
        BinaryPrimitives.WriteUInt16BigEndian(h[6..], 0);
        BinaryPrimitives.WriteUInt64BigEndian(h[8..], cookie);
        BinaryPrimitives.WriteUInt64BigEndian(h[16..], (ulong)offset);
        BinaryPrimitives.WriteUInt32BigEndian(h[24..], (uint)length);
    }

    private void Handshake()
    {
        var greeting = new byte[18];
        ReceiveExact(greeting);
        _client.Send([0, 0, 0, 3]); // fixed newstyle, no zeroes
        var go = new byte[16 + 6];
        BinaryPrimitives.WriteUInt64BigEndian(go, 0x49484156454F5054);
        BinaryPrimitives.WriteUInt32BigEndian(go.AsSpan(8), 7); // NBD_OPT_GO, default export, no info requests
        BinaryPrimitives.WriteUInt32BigEndian(go.AsSpan(12), 6);
        _client.Send(go);
        var header = new byte[20];
        while (true)
        {
            ReceiveExact(header);
            var type = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
            var data = new byte[BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(16))];
            ReceiveExact(data);
            if (type == 1)
            {
                return;
            }
            if (type != 3)
            {
                throw new InvalidOperationException($"NBD_OPT_GO failed with reply type 0x{type:x}");
            }
        }
    }

    private void ReceiveExact(Span<byte> buffer)
    {
        while (!buffer.IsEmpty)
        {
            var n = _client.Receive(buffer);
            if (n == 0)
            {
                throw new EndOfStreamException("the server closed the connection");
            }
            buffer = buffer[n..];
        }
    }
}
