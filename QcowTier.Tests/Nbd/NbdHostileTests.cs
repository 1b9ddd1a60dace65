using System.Buffers.Binary;
using System.Text;
using QcowTier.Nbd;
using QcowTier.Tests.Cli;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Nbd;

/// <summary>Clients that misbehave: each gets an error reply or loses its own connection; the server and image stay sound.</summary>
public sealed class NbdHostileTests
{
    private const ushort Read = 0, Write = 1, Disc = 2, Flush = 3, Trim = 4, WriteZeroes = 6, BlockStatus = 7;
    private const uint EPerm = 1, EInval = 22, ENoSpc = 28, EOverflow = 75;

    /// <summary>After the hostile part, a real client still reads and writes, and the image checks clean.</summary>
    private static async Task GoodClientStillWorks(Served s)
    {
        NbdTools.QemuIo(s.Uri, "write -P 0x3c 1M 64k", "read -P 0x3c 1M 64k").EnsureSuccess();
        for (var i = 0; i < 100 && s.Server.ConnectionCount > 0; i++)
        {
            await Task.Delay(20);
        }
        s.Server.ConnectionCount.Should().Be(0, "every hostile connection was closed");
        await s.CloseAsync();
        Qemu.AssertClean(s.ImagePath);
        CliHarness.QemuIo(s.ImagePath, "qcow2", "read -P 0x3c 1M 64k");
    }

    [Fact]
    public async Task Garbage_and_broken_handshakes_close_only_their_connection()
    {
        await using var s = Served.Blank();
        var random = new Random(1234);

        // Random bytes instead of client flags.
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Receive(18);
            var junk = new byte[4096];
            random.NextBytes(junk);
            junk[0] = 0xff;
            c.Send(junk);
            c.ServerClosed().Should().BeTrue();
        }
        // Connect and leave at once; connect, greet halfway and leave.
        new RawNbdClient(s.Socket).Dispose();
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Receive(18);
            c.Send(new byte[] { 0, 0 });
        }
        // Bad option magic.
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Greet();
            c.Send(Encoding.ASCII.GetBytes("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
            c.ServerClosed().Should().BeTrue();
        }
        // An option claiming a gigabyte of data.
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Greet();
            c.SendOption(7, [], declaredLength: 1u << 30);
            c.ServerClosed().Should().BeTrue();
        }
        // Unknown options and malformed known ones are refused, and the handshake goes on.
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Greet();
            c.SendOption(0x4242, [1, 2, 3]);
            c.ReadOptionReply().Type.Should().Be(0x80000001u, "NBD_REP_ERR_UNSUP");
            c.SendOption(3, [1]);
            c.ReadOptionReply().Type.Should().Be(0x80000003u, "NBD_OPT_LIST with data is NBD_REP_ERR_INVALID");
            c.SendOption(7, [0, 0, 0, 9, 1]);
            c.ReadOptionReply().Type.Should().Be(0x80000003u, "a name longer than the option");
            c.SendOption(10, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15]);
            c.ReadOptionReply().Type.Should().Be(0x80000003u, "meta contexts before structured replies");
            var name = Encoding.UTF8.GetBytes("nope");
            var go = new byte[4 + name.Length + 2];
            BinaryPrimitives.WriteUInt32BigEndian(go, (uint)name.Length);
            name.CopyTo(go, 4);
            c.SendOption(7, go);
            c.ReadOptionReply().Type.Should().Be(0x80000006u, "NBD_REP_ERR_UNKNOWN");
            c.SendOption(2, []);
            c.ReadOptionReply().Type.Should().Be(1u, "NBD_OPT_ABORT is acknowledged");
            c.ServerClosed().Should().BeTrue();
        }
        // NBD_OPT_EXPORT_NAME of a missing export can only hang up.
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Greet();
            c.SendOption(1, Encoding.UTF8.GetBytes("missing"));
            c.ServerClosed().Should().BeTrue();
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Idle_handshake_times_out()
    {
        await using var s = Served.Blank(options: new NbdServerOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(300) });
        using var c = new RawNbdClient(s.Socket);
        c.Greet();
        var started = DateTime.UtcNow;
        c.ServerClosed().Should().BeTrue();
        (DateTime.UtcNow - started).Should().BeLessThan(TimeSpan.FromSeconds(5));
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Connections_beyond_the_limit_are_closed()
    {
        await using var s = Served.Blank(options: new NbdServerOptions { MaxConnections = 2 });
        using var a = new RawNbdClient(s.Socket);
        using var b = new RawNbdClient(s.Socket);
        a.Greet();
        b.Greet();
        using (var c = new RawNbdClient(s.Socket))
        {
            c.ServerClosed().Should().BeTrue();
        }
        a.Dispose();
        b.Dispose();
        for (var i = 0; i < 100 && s.Server.ConnectionCount > 0; i++)
        {
            await Task.Delay(20);
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Bad_requests_get_error_replies_and_the_connection_goes_on()
    {
        await using var s = Served.Blank("8M");
        using (var c = new RawNbdClient(s.Socket))
        {
            var (size, _) = c.Go();
            size.Should().Be(8 << 20);
            c.SendRequest(Read, (8 << 20) - 512, 4096, cookie: 1);
            c.ReadSimpleReply().Should().Be((EInval, 1ul), "a read past the end");
            c.SendRequest(Read, ulong.MaxValue - 100, 4096, cookie: 2);
            c.ReadSimpleReply().Should().Be((EInval, 2ul), "offset + length wraps around");
            c.SendRequest(Read, 0, 64 << 20, cookie: 3);
            c.ReadSimpleReply().Should().Be((EInval, 3ul), "a read larger than the maximum payload");
            c.SendRequest(99, 0, 4096, cookie: 4);
            c.ReadSimpleReply().Should().Be((EInval, 4ul), "an unknown command");
            c.SendRequest(Read, 0, 4096, flags: 0x40, cookie: 5);
            c.ReadSimpleReply().Should().Be((EInval, 5ul), "an unknown command flag");
            c.SendRequest(BlockStatus, 0, 4096, cookie: 6);
            c.ReadSimpleReply().Should().Be((EInval, 6ul), "block status without a metadata context");
            c.SendRequest(Write, 8 << 20, 4096, cookie: 7);
            c.Send(new byte[4096]);
            c.ReadSimpleReply().Should().Be((ENoSpc, 7ul), "a write past the end (its payload is skipped)");
            c.SendRequest(WriteZeroes, 7 << 20, 2 << 20, cookie: 8);
            c.ReadSimpleReply().Should().Be((ENoSpc, 8ul));
            c.SendRequest(Trim, 7 << 20, 2 << 20, cookie: 9);
            c.ReadSimpleReply().Should().Be((EInval, 9ul));

            // Still in sync: a good write and read.
            c.SendRequest(Write, 4096, 4096, cookie: 10);
            c.Send(Enumerable.Repeat((byte)0x61, 4096).ToArray());
            c.ReadSimpleReply().Should().Be((0u, 10ul));
            c.SendRequest(Read, 4096, 4096, cookie: 11);
            c.ReadSimpleReply().Should().Be((0u, 11ul));
            c.Receive(4096).Should().OnlyContain(b => b == 0x61);
            c.SendRequest(Flush, 0, 0, cookie: 12);
            c.ReadSimpleReply().Should().Be((0u, 12ul));

            // A request with bad magic: nothing after it can be trusted, so the server hangs up.
            c.SendRequest(Read, 0, 512, magic: 0x12345678);
            c.ServerClosed().Should().BeTrue();
        }
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Go();
            c.SendRequest(Write, 0, 64 << 20, cookie: 1);
            c.ServerClosed().Should().BeTrue("a write payload over the limit is not read");
        }
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Go();
            c.SendRequest(Write, 0, 1 << 20, cookie: 1);
            c.Send(new byte[1000]); // and vanish in the middle of the payload
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Structured_replies_carry_data_chunks_and_error_messages()
    {
        await using var s = Served.Blank("8M");
        NbdTools.QemuIo(s.Uri, "write -P 0x7e 0 64k").EnsureSuccess();
        using (var c = new RawNbdClient(s.Socket))
        {
            var (_, flags) = c.Go(structured: true);
            (flags & (1 << 7)).Should().NotBe(0, "NBD_FLAG_SEND_DF comes with structured replies");
            c.SendRequest(Read, 512, 1024, cookie: 1);
            var chunk = c.ReadChunk();
            (chunk.Flags, chunk.Type, chunk.Cookie).Should().Be(((ushort)1, (ushort)1, 1ul));
            BinaryPrimitives.ReadUInt64BigEndian(chunk.Payload).Should().Be(512);
            chunk.Payload.Skip(8).Should().HaveCount(1024).And.OnlyContain(b => b == 0x7e);

            c.SendRequest(Read, 8 << 20, 512, cookie: 2);
            chunk = c.ReadChunk();
            (chunk.Flags, chunk.Type, chunk.Cookie).Should().Be(((ushort)1, (ushort)0x8001, 2ul));
            BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload).Should().Be(EInval);
            var messageLength = BinaryPrimitives.ReadUInt16BigEndian(chunk.Payload.AsSpan(4));
            Encoding.UTF8.GetString(chunk.Payload, 6, messageLength).Should().Contain("beyond the end");

            c.SendRequest(Read, 0, 64 << 20, cookie: 3);
            chunk = c.ReadChunk();
            BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload).Should().Be(EOverflow);

            c.SendRequest(Read, 0, 0, cookie: 4);
            chunk = c.ReadChunk();
            (chunk.Flags, chunk.Type, chunk.Cookie).Should().Be(((ushort)1, (ushort)0, 4ul), "an empty read is one NBD_REPLY_TYPE_NONE");
            c.SendRequest(Disc, 0, 0);
            c.ServerClosed().Should().BeTrue();
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task A_burst_of_pipelined_requests_gets_every_reply_with_its_cookie()
    {
        await using var s = Served.Blank("8M");
        NbdTools.QemuIo(s.Uri, "write -P 0x10 0 4M", "write -P 0x20 4M 4M").EnsureSuccess();
        using (var c = new RawNbdClient(s.Socket))
        {
            c.Go();
            const int count = 2000; // far more than the server keeps in progress: it must push back, not grow
            var sender = Task.Run(() =>
            {
                for (var i = 0; i < count; i++)
                {
                    c.SendRequest(Read, (ulong)(i % 2048) * 4096, 4096, cookie: (ulong)i);
                }
            });
            var seen = new bool[count];
            for (var i = 0; i < count; i++)
            {
                var (error, cookie) = c.ReadSimpleReply();
                error.Should().Be(0);
                var data = c.Receive(4096);
                var expected = (cookie % 2048) * 4096 < (4 << 20) ? 0x10 : 0x20;
                data.Should().OnlyContain(b => b == expected);
                seen[cookie].Should().BeFalse();
                seen[cookie] = true;
            }
            await sender;
            seen.Should().OnlyContain(x => x);
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Random_requests_never_hurt_the_server()
    {
        await using var s = Served.Blank("4M");
        var random = new Random(99);
        for (var round = 0; round < 20; round++)
        {
            using var c = new RawNbdClient(s.Socket);
            c.Go(structured: round % 2 == 0);
            for (var i = 0; i < 20; i++)
            {
                var type = (ushort)random.Next(0, 10);
                if (type is Write or Disc)
                {
                    continue; // a random write length decides whether a payload follows: covered above
                }
                c.SendRequest(type, (ulong)random.NextInt64(0, 8 << 20), (uint)random.Next(0, 1 << 20), flags: (ushort)random.Next(0, 64), cookie: (ulong)i);
            }
            var junk = new byte[random.Next(1, 200)];
            random.NextBytes(junk);
            c.Send(junk);
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Fast_zero_is_refused_where_zeroing_means_writing()
    {
        using var dir = new TempDir();
        foreach (var (compat, fast) in new[] { ("1.1", true), ("0.10", false) })
        {
            var path = dir.File($"z{compat}.qcow2");
            Qemu.Img("create", "-q", "-f", "qcow2", "-o", $"compat={compat}", path, "8M").EnsureSuccess();
            CliHarness.QemuIo(path, "qcow2", "write -P 0x44 0 1M");
            using var sub = new TempDir();
            await using var s = Served.Start(sub, path);
            using (var c = new RawNbdClient(s.Socket))
            {
                var (_, flags) = c.Go();
                (flags & (1 << 11)).Should().NotBe(0, "NBD_FLAG_SEND_FAST_ZERO");
                c.SendRequest(WriteZeroes, 0, 1 << 20, flags: 1 << 4, cookie: 1);
                c.ReadSimpleReply().Should().Be((fast ? 0u : 95u, 1ul), $"compat={compat}");
                c.SendRequest(WriteZeroes, 0, 512 << 10, flags: 1 << 1 | 1 << 0, cookie: 2); // NO_HOLE | FUA
                c.ReadSimpleReply().Should().Be((0u, 2ul));
            }
            await s.CloseAsync();
            CliHarness.QemuIo(path, "qcow2", "read -P 0 0 512k", fast ? "read -P 0 512k 512k" : "read -P 0x44 512k 512k");
            Qemu.AssertClean(path);
        }
    }

    [Fact]
    public async Task Block_status_answers_one_extent_when_asked()
    {
        await using var s = Served.Blank("8M");
        NbdTools.QemuIo(s.Uri, "write -P 1 64k 128k").EnsureSuccess();
        using var c = new RawNbdClient(s.Socket);
        c.Greet();
        c.SendOption(8, []);
        c.ReadOptionReply().Type.Should().Be(1u);
        var query = Encoding.UTF8.GetBytes("base:allocation");
        var set = new byte[4 + 4 + 4 + query.Length];
        BinaryPrimitives.WriteUInt32BigEndian(set.AsSpan(4), 1);
        BinaryPrimitives.WriteUInt32BigEndian(set.AsSpan(8), (uint)query.Length);
        query.CopyTo(set, 12);
        c.SendOption(10, set);
        var (_, type, data) = c.ReadOptionReply();
        type.Should().Be(4u, "NBD_REP_META_CONTEXT");
        var id = BinaryPrimitives.ReadUInt32BigEndian(data);
        Encoding.UTF8.GetString(data, 4, data.Length - 4).Should().Be("base:allocation");
        c.ReadOptionReply().Type.Should().Be(1u);
        c.SendOption(7, new byte[6]);
        while (c.ReadOptionReply().Type != 1)
        {
        }

        c.SendRequest(BlockStatus, 0, 1 << 20, cookie: 1);
        var chunk = c.ReadChunk();
        (chunk.Flags, chunk.Type).Should().Be(((ushort)1, (ushort)5));
        BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload).Should().Be(id);
        var extents = Enumerable.Range(0, (chunk.Payload.Length - 4) / 8)
            .Select(i => (BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(4 + 8 * i)), BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(8 + 8 * i))))
            .ToList();
        extents.Should().Equal((65536u, 3u), (131072u, 0u), ((1u << 20) - 196608u, 3u));

        c.SendRequest(BlockStatus, 70000, 1000, flags: 1 << 3, cookie: 2);
        chunk = c.ReadChunk();
        chunk.Payload.Should().HaveCount(12, "REQ_ONE: one descriptor");
        BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(4)).Should().BeLessThanOrEqualTo(1000);
        BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(8)).Should().Be(0);
    }

    [Fact]
    public async Task Export_name_option_sends_the_zeroes_unless_told_not_to()
    {
        await using var s = Served.Blank("8M");
        foreach (var (clientFlags, replyLength) in new[] { (1u, 134), (3u, 10) })
        {
            using var c = new RawNbdClient(s.Socket);
            (c.Greet(clientFlags) & 3).Should().Be(3, "fixed newstyle and no-zeroes offered");
            c.SendOption(1, []);
            var reply = c.Receive(replyLength);
            BinaryPrimitives.ReadUInt64BigEndian(reply).Should().Be(8 << 20);
            reply.Skip(10).All(b => b == 0).Should().BeTrue();
            c.SendRequest(Read, 0, 512, cookie: 5);
            c.ReadSimpleReply().Should().Be((0u, 5ul), "straight into transmission, in sync");
            c.Receive(512);
        }
        await GoodClientStillWorks(s);
    }

    [Fact]
    public async Task Stopping_in_the_middle_of_a_burst_answers_what_was_read_and_keeps_it()
    {
        await using var s = Served.Blank("64M");
        using var c = new RawNbdClient(s.Socket);
        c.Go();
        const int count = 200;
        var payload = new byte[64 << 10];
        var sender = Task.Run(() =>
        {
            try
            {
                for (var i = 0; i < count; i++)
                {
                    Array.Fill(payload, (byte)(i + 1));
                    c.SendRequest(Write, (ulong)i * (64 << 10), 64 << 10, cookie: (ulong)i);
                    c.Send(payload);
                }
            }
            catch (System.Net.Sockets.SocketException)
            {
                // The server stopped reading and closed: the rest of the burst has nowhere to go.
            }
        });
        // Some replies first, so that the stop lands in the middle of the burst.
        var acknowledged = new List<int>();
        for (var i = 0; i < 10; i++)
        {
            var (error, cookie) = c.ReadSimpleReply();
            error.Should().Be(0);
            acknowledged.Add((int)cookie);
        }
        var stop = s.StopAsync();
        try
        {
            while (true)
            {
                var (error, cookie) = c.ReadSimpleReply();
                error.Should().Be(0, "requests read before the stop are carried out, not failed");
                acknowledged.Add((int)cookie);
            }
        }
        catch (Exception e) when (e is EndOfStreamException or System.Net.Sockets.SocketException)
        {
        }
        await stop;
        await sender;
        acknowledged.Should().OnlyHaveUniqueItems();
        // Flushed by the stop, with the image still open: every acknowledged write is in the file.
        Qemu.Img("check", "-U", "-f", "qcow2", s.ImagePath).EnsureSuccess();
        var reads = acknowledged.Take(40).Select(i => $"read -P {i + 1} {i * 64}k 64k").ToArray();
        Qemu.Io(["-U", "-r", "-f", "qcow2", .. reads.SelectMany(r => new[] { "-c", r }), s.ImagePath]).EnsureSuccess();
    }
}
