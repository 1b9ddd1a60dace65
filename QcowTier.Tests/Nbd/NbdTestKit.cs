using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using QcowTier.Nbd;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Nbd;

/// <summary>An image served over a Unix socket in a temporary directory, stopped and closed at dispose.</summary>
internal sealed class Served : IAsyncDisposable
{
    private bool _stopped;
    private bool _ownsDir;

    private Served(TempDir dir, string imagePath, QcowImage image, NbdServer server)
    {
        Dir = dir;
        ImagePath = imagePath;
        Image = image;
        Server = server;
    }

    public TempDir Dir { get; }

    public string ImagePath { get; }

    public QcowImage Image { get; }

    public NbdServer Server { get; }

    public string Socket => Dir.File("nbd.sock");

    public string Uri => Server.GetUri();

    /// <summary>Serves a new blank qcow2 image (made by qemu-img) of <paramref name="size"/>.</summary>
    public static Served Blank(string size = "64M", bool readOnly = false, string? heat = null, NbdServerOptions? options = null)
    {
        var dir = new TempDir();
        var path = dir.File("disk.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, size).EnsureSuccess();
        var served = Start(dir, path, readOnly, heat, options);
        served._ownsDir = true;
        return served;
    }

    public static Served Start(TempDir dir, string path, bool readOnly = false, string? heat = null, NbdServerOptions? options = null, QcowImage? image = null)
    {
        image ??= QcowImage.Open(path, new QcowOpenOptions { ReadOnly = readOnly });
        var socket = dir.File("nbd.sock");
        var server = new NbdServer(
            [new NbdExport("", image) { ReadOnly = readOnly, HeatFile = heat, Description = "test disk" }],
            new NbdServerOptions
            {
                UnixSocketPath = socket,
                HandshakeTimeout = options?.HandshakeTimeout ?? TimeSpan.FromSeconds(10),
                MaxConnections = options?.MaxConnections ?? 64,
                HeatSaveInterval = options?.HeatSaveInterval ?? TimeSpan.FromSeconds(60),
            });
        server.Start();
        return new Served(dir, path, image, server);
    }

    /// <summary>Stops the server (flushing the image) but leaves the image open.</summary>
    public async Task StopAsync()
    {
        _stopped = true;
        await Server.StopAsync();
    }

    /// <summary>Stops, closes the image; the directory stays until <see cref="DisposeAsync"/>.</summary>
    public async Task CloseAsync()
    {
        if (!_stopped)
        {
            await StopAsync();
        }
        Image.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            await CloseAsync();
        }
        finally
        {
            if (_ownsDir)
            {
                Dir.Dispose();
            }
        }
    }
}

/// <summary>Runs the NBD client tools; each throws with its output when it fails unless asked not to.</summary>
internal static class NbdTools
{
    public static bool Available => File.Exists("/usr/bin/nbdinfo") && File.Exists("/usr/bin/nbdcopy") && Qemu.Available;

    public static Qemu.Result QemuIo(string uri, params string[] commands) => QemuIo(uri, false, commands);

    public static Qemu.Result QemuIo(string uri, bool readOnly, params string[] commands)
    {
        var args = new List<string> { "-f", "raw" };
        if (readOnly)
        {
            args.Add("-r");
        }
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(uri);
        return Qemu.Run("qemu-io", args, TimeSpan.FromSeconds(30));
    }

    public static Qemu.Result Run(string tool, params string[] args) => Qemu.Run(tool, args, TimeSpan.FromSeconds(30));
}

/// <summary>
/// A deliberately small NBD client speaking raw bytes, for what real clients never send: bad magic,
/// oversized and out-of-range requests, unknown commands and options.
/// </summary>
internal sealed class RawNbdClient : IDisposable
{
    private readonly Socket _socket;

    public RawNbdClient(string socketPath)
    {
        _socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = 10000, SendTimeout = 10000 };
        _socket.Connect(new UnixDomainSocketEndPoint(socketPath));
    }

    public Socket Socket => _socket;

    public void Send(ReadOnlySpan<byte> data) => _socket.Send(data);

    public byte[] Receive(int count)
    {
        var buffer = new byte[count];
        var got = 0;
        while (got < count)
        {
            var n = _socket.Receive(buffer, got, count - got, SocketFlags.None);
            if (n == 0)
            {
                throw new EndOfStreamException($"server closed after {got} of {count} bytes");
            }
            got += n;
        }
        return buffer;
    }

    /// <summary>True when the server closed the connection (a read returns end of stream) within the timeout.</summary>
    public bool ServerClosed()
    {
        try
        {
            var buffer = new byte[4096];
            while (true)
            {
                if (_socket.Receive(buffer) == 0)
                {
                    return true;
                }
            }
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    /// <summary>Greeting and client flags; returns the server's handshake flags.</summary>
    public ushort Greet(uint clientFlags = 3)
    {
        var g = Receive(18);
        BinaryPrimitives.ReadUInt64BigEndian(g).Should().Be(0x4e42444d41474943);
        BinaryPrimitives.ReadUInt64BigEndian(g.AsSpan(8)).Should().Be(0x49484156454F5054);
        var flags = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(flags, clientFlags);
        Send(flags);
        return BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(16));
    }

    public void SendOption(uint option, ReadOnlySpan<byte> data, uint? declaredLength = null)
    {
        var h = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(h, 0x49484156454F5054);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), option);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(12), declaredLength ?? (uint)data.Length);
        Send(h);
        Send(data);
    }

    /// <summary>One option reply: its type and data.</summary>
    public (uint Option, uint Type, byte[] Data) ReadOptionReply()
    {
        var h = Receive(20);
        BinaryPrimitives.ReadUInt64BigEndian(h).Should().Be(0x3e889045565a9);
        var len = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16));
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(8)), BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)), Receive((int)len));
    }

    /// <summary>Greets, optionally negotiates structured replies, and enters transmission with NBD_OPT_GO; returns size and flags.</summary>
    public (ulong Size, ushort Flags) Go(string name = "", bool structured = false)
    {
        Greet();
        if (structured)
        {
            SendOption(8, []);
            ReadOptionReply().Type.Should().Be(1);
        }
        var n = Encoding.UTF8.GetBytes(name);
        var data = new byte[4 + n.Length + 2];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)n.Length);
        n.CopyTo(data, 4);
        SendOption(7, data);
        ulong size = 0;
        ushort flags = 0;
        while (true)
        {
            var (_, type, d) = ReadOptionReply();
            if (type == 1)
            {
                return (size, flags);
            }
            type.Should().Be(3, "only NBD_REP_INFO precedes the ACK");
            if (BinaryPrimitives.ReadUInt16BigEndian(d) == 0)
            {
                size = BinaryPrimitives.ReadUInt64BigEndian(d.AsSpan(2));
                flags = BinaryPrimitives.ReadUInt16BigEndian(d.AsSpan(10));
            }
        }
    }

    public void SendRequest(ushort type, ulong offset, uint length, ushort flags = 0, ulong cookie = 42, uint magic = 0x25609513)
    {
        var h = new byte[28];
        BinaryPrimitives.WriteUInt32BigEndian(h, magic);
        BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(4), flags);
        BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(6), type);
        BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(16), offset);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(24), length);
        Send(h);
    }

    /// <summary>A simple reply: its error and cookie (a successful read's data follows; read it with <see cref="Receive"/>).</summary>
    public (uint Error, ulong Cookie) ReadSimpleReply()
    {
        var h = Receive(16);
        BinaryPrimitives.ReadUInt32BigEndian(h).Should().Be(0x67446698);
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(4)), BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(8)));
    }

    /// <summary>A structured reply chunk: flags, type, cookie and payload.</summary>
    public (ushort Flags, ushort Type, ulong Cookie, byte[] Payload) ReadChunk()
    {
        var h = Receive(20);
        BinaryPrimitives.ReadUInt32BigEndian(h).Should().Be(0x668e33ef);
        var len = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16));
        return (BinaryPrimitives.ReadUInt16BigEndian(h.AsSpan(4)), BinaryPrimitives.ReadUInt16BigEndian(h.AsSpan(6)), BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(8)), Receive((int)len));
    }

    public void Dispose() => _socket.Dispose();
}
