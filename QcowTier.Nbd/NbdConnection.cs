using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;

namespace QcowTier.Nbd;

/// <summary>
/// One client: the handshake, then the transmission phase. The reader (this class's loop) parses and
/// validates requests, reads write payloads and queues each request to the thread pool; workers run it
/// against the image and post the reply to the connection's <see cref="ReplySender"/>. Credits bound what
/// one client can have in progress (requests and payload bytes), so a flood of requests only stops the
/// reader, never grows memory.
/// </summary>
internal sealed partial class NbdConnection : IDisposable
{
    /// <summary>Room reserved before read data in a reply buffer, for the longest reply header (structured, 28 bytes).</summary>
    private const int ReadPrefix = 32;
    private const int CreditBytes = 1 << 20;

    private readonly NbdServer _server;
    private readonly Socket _socket;
    private readonly InputBuffer _in;
    private readonly byte[] _inBuffer;
    private readonly CancellationTokenSource _cts;
    private readonly SemaphoreSlim _credits;
    private readonly int _maxCredits;
    private readonly int _inlineReadLimit;
    private const long SlowInlineReadTicks = 100 * TimeSpan.TicksPerMillisecond / 1000;
    private long _requests;
    private long _dispatchUntil;
    private readonly TaskCompletionSource _drained = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Stack<Request> _requestPool = new();
    private ReplySender? _sender;
    private ExportState _export = null!;
    private int _inFlight = 1; // the reader's own reference, dropped when it stops

    public NbdConnection(NbdServer server, Socket socket)
    {
        _server = server;
        _socket = socket;
        if (socket.AddressFamily is AddressFamily.InterNetwork or AddressFamily.InterNetworkV6)
        {
            socket.NoDelay = true;
        }
        // Large buffers let a 32 MiB reply or a deep queue of requests move with few system calls.
        TrySetBuffers(socket, 4 << 20);
        _inBuffer = Buffers.Pool.Rent(256 << 10);
        _in = new InputBuffer(socket, _inBuffer);
        _cts = CancellationTokenSource.CreateLinkedTokenSource(server.Stopping);
        var options = server.Options;
        // Each request takes one credit plus one per MiB of payload: at most MaxRequestsPerConnection
        // requests, and (beyond the first large one) about that many MiB of buffers, in progress.
        _maxCredits = Math.Max(options.MaxRequestsPerConnection, options.MaxPayload / CreditBytes + 1);
        _credits = new SemaphoreSlim(_maxCredits, _maxCredits);
        _inlineReadLimit = options.InlineReadLimit;
    }

    /// <summary>Closes the socket now: pending sends and receives fail and the loops end.</summary>
    public void Abort()
    {
        try
        {
            _cts.Cancel();
        }
        catch (ObjectDisposedException)
        {
        }
        _socket.Dispose();
    }

    public async Task RunAsync()
    {
        try
        {
            ExportState? export;
            using (var handshake = CancellationTokenSource.CreateLinkedTokenSource(_cts.Token))
            {
                handshake.CancelAfter(_server.Options.HandshakeTimeout);
                try
                {
                    export = await HandshakeAsync(handshake.Token).ConfigureAwait(false);
                }
                catch (Exception e) when (IsDisconnect(e))
                {
                    export = null;
                }
            }
            if (export is not null)
            {
                _export = export;
                _sender = new ReplySender(_socket);
                await TransmitAsync().ConfigureAwait(false);
            }
        }
        finally
        {
            try
            {
                _socket.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
            }
            Dispose();
        }
    }

    /// <summary>Releases the socket and buffers; only once every request has finished (the end of <see cref="RunAsync"/>).</summary>
    public void Dispose()
    {
        _socket.Dispose();
        _cts.Dispose();
        _credits.Dispose();
        Buffers.Pool.Return(_inBuffer);
    }

    private static bool IsDisconnect(Exception e)
        => e is OperationCanceledException or SocketException or IOException or ObjectDisposedException;

    private async Task TransmitAsync()
    {
        var ct = _cts.Token;
        try
        {
            var sender = _sender!;
            var held = 0;
            long heldBytes = 0;
            while (true)
            {
                // Replies of requests run here wait while more requests are already received, then go out
                // together; they never wait for the network, nor pile up beyond a few dozen or 256 KiB.
                if (_in.Available < Protocol.RequestHeaderLength || held >= 32 || heldBytes >= 256 << 10)
                {
                    sender.Uncork();
                    held = 0;
                    heldBytes = 0;
                }
                if (!await _in.EnsureAsync(Protocol.RequestHeaderLength, ct).ConfigureAwait(false))
                {
                    break;
                }
                sender.Cork();
                held++;
                var h = _in.Span;
                var magic = BinaryPrimitives.ReadUInt32BigEndian(h);
                var flags = BinaryPrimitives.ReadUInt16BigEndian(h[4..]);
                var type = BinaryPrimitives.ReadUInt16BigEndian(h[6..]);
                var cookie = BinaryPrimitives.ReadUInt64BigEndian(h[8..]);
                var offset = BinaryPrimitives.ReadUInt64BigEndian(h[16..]);
                var length = BinaryPrimitives.ReadUInt32BigEndian(h[24..]);
                _in.Consume(Protocol.RequestHeaderLength);
                if (magic != Protocol.RequestMagic)
                {
                    return; // out of sync with the client: nothing after this can be parsed
                }
                if (type == Protocol.CmdDisc)
                {
                    return;
                }
                var error = Validate(flags, type, offset, length, out var message);
                if (type == Protocol.CmdWrite)
                {
                    if (length > _export.MaximumPayload)
                    {
                        return; // its payload cannot be taken without the memory it would cost: hang up, as qemu-nbd
                    }
                    if (error != 0)
                    {
                        sender.Uncork();
                        await _in.SkipAsync(length, ct).ConfigureAwait(false);
                    }
                }
                if (error != 0)
                {
                    PostError(cookie, error, message);
                    continue;
                }
                var payloadBytes = type is Protocol.CmdRead or Protocol.CmdWrite ? (int)length : 0;
                var credits = 1 + payloadBytes / CreditBytes;
                if (_credits.CurrentCount < credits)
                {
                    sender.Uncork();
                }
                for (var i = 0; i < credits; i++)
                {
                    await _credits.WaitAsync(ct).ConfigureAwait(false);
                }
                var r = RentRequest();
                r.Flags = flags;
                r.Type = type;
                r.Cookie = cookie;
                r.Offset = (long)offset;
                r.Length = length;
                r.Credits = credits;
                if (type == Protocol.CmdWrite)
                {
                    r.Payload = Buffers.Pool.Rent((int)length);
                    if (_in.Available < length)
                    {
                        sender.Uncork();
                    }
                    try
                    {
                        await _in.ReadExactAsync(r.Payload.AsMemory(0, (int)length), ct).ConfigureAwait(false);
                    }
                    catch
                    {
                        Finish(r);
                        throw;
                    }
                }
                Interlocked.Increment(ref _inFlight);
                _requests++;
                if (type == Protocol.CmdRead && length <= _inlineReadLimit && _requests >= _dispatchUntil)
                {
                    // A small read from cache costs less than the hop to another thread; its reply waits
                    // (corked) for the other requests already received, and they leave in one send. A read
                    // that had to wait for a disk (an HDD tier) would hold up every request behind it, so
                    // after a slow one the next reads go to the thread pool, where they overlap.
                    var started = Stopwatch.GetTimestamp();
                    heldBytes += length;
                    Execute(r);
                    // Slow: 100 µs plus 1 ns per byte (1 GB/s). A read from the page cache is several
                    // times faster than that at any size, one that waited for an HDD far slower.
                    if (Stopwatch.GetElapsedTime(started).Ticks > SlowInlineReadTicks + length / 100)
                    {
                        _dispatchUntil = _requests + 256;
                    }
                }
                else
                {
                    ThreadPool.UnsafeQueueUserWorkItem(r, preferLocal: false);
                }
            }
        }
        catch (Exception e) when (IsDisconnect(e))
        {
            // The client went away, the server is stopping, or the socket was aborted.
        }
        finally
        {
            // Requests already read are finished and answered before the socket closes.
            if (Interlocked.Decrement(ref _inFlight) == 0)
            {
                _drained.TrySetResult();
            }
            await _drained.Task.ConfigureAwait(false);
            await _sender!.CompleteAsync().ConfigureAwait(false);
        }
    }

    /// <summary>The error a request gets without being run, or 0.</summary>
    private uint Validate(ushort flags, ushort type, ulong offset, uint length, out string? message)
    {
        message = null;
        var e = _export;
        var end = offset + length;
        var inRange = offset <= (ulong)e.Size && end >= offset && end <= (ulong)e.Size;
        ushort allowed = Protocol.CmdFlagFua;
        switch (type)
        {
            case Protocol.CmdRead:
                allowed |= _structured ? Protocol.CmdFlagDf : (ushort)0;
                if (length > e.MaximumPayload)
                {
                    message = $"read of {length} bytes exceeds the maximum payload of {e.MaximumPayload}";
                    return _structured ? Protocol.EOverflow : Protocol.EInval;
                }
                if (!inRange)
                {
                    message = "read beyond the end of the export";
                    return Protocol.EInval;
                }
                break;
            case Protocol.CmdWrite:
                if (e.ReadOnly)
                {
                    message = "the export is read-only";
                    return Protocol.EPerm;
                }
                if (!inRange)
                {
                    message = "write beyond the end of the export";
                    return Protocol.ENoSpc;
                }
                break;
            case Protocol.CmdFlush:
                break;
            case Protocol.CmdTrim:
                if (e.ReadOnly)
                {
                    message = "the export is read-only";
                    return Protocol.EPerm;
                }
                if (!inRange)
                {
                    message = "trim beyond the end of the export";
                    return Protocol.EInval;
                }
                break;
            case Protocol.CmdCache:
                if (!inRange)
                {
                    message = "cache request beyond the end of the export";
                    return Protocol.EInval;
                }
                break;
            case Protocol.CmdWriteZeroes:
                allowed |= Protocol.CmdFlagNoHole | Protocol.CmdFlagFastZero;
                if (e.ReadOnly)
                {
                    message = "the export is read-only";
                    return Protocol.EPerm;
                }
                if (!inRange)
                {
                    message = "write zeroes beyond the end of the export";
                    return Protocol.ENoSpc;
                }
                break;
            case Protocol.CmdBlockStatus:
                allowed |= Protocol.CmdFlagReqOne;
                if (!_metaAllocation)
                {
                    message = "no metadata context was negotiated";
                    return Protocol.EInval;
                }
                if (!inRange || length == 0)
                {
                    message = "block status beyond the end of the export";
                    return Protocol.EInval;
                }
                break;
            default:
                message = $"unknown command {type}";
                return Protocol.EInval;
        }
        if ((flags & ~allowed) != 0)
        {
            message = $"command flags 0x{flags:x} are not valid for command {type}";
            return Protocol.EInval;
        }
        return 0;
    }

    // ------------------------------------------------------------------ workers

    internal void Execute(Request r)
    {
        try
        {
            var image = _export.Image;
            switch (r.Type)
            {
                case Protocol.CmdRead:
                    ExecuteRead(r);
                    return;
                case Protocol.CmdWrite:
                    image.Write(r.Offset, r.Payload.AsSpan(0, (int)r.Length));
                    FlushIfFua(r);
                    break;
                case Protocol.CmdFlush:
                    if (!_export.ReadOnly)
                    {
                        image.Flush();
                    }
                    break;
                case Protocol.CmdTrim:
                    image.Discard(r.Offset, r.Length);
                    FlushIfFua(r);
                    break;
                case Protocol.CmdCache:
                    break;
                case Protocol.CmdWriteZeroes:
                    if ((r.Flags & Protocol.CmdFlagFastZero) != 0 && !_export.FastZero)
                    {
                        PostError(r.Cookie, Protocol.ENotSup, "zeroing is no faster than writing on this image");
                        return;
                    }
                    image.WriteZeroes(r.Offset, r.Length, mayUnmap: (r.Flags & Protocol.CmdFlagNoHole) == 0);
                    FlushIfFua(r);
                    break;
                case Protocol.CmdBlockStatus:
                    ExecuteBlockStatus(r);
                    return;
            }
            PostSimple(r.Cookie, 0);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            PostError(r.Cookie, ErrnoOf(e), e.Message);
        }
        finally
        {
            Finish(r);
            if (Interlocked.Decrement(ref _inFlight) == 0)
            {
                _drained.TrySetResult();
            }
        }
    }

    private void FlushIfFua(Request r)
    {
        if ((r.Flags & Protocol.CmdFlagFua) != 0)
        {
            _export.Image.Flush();
        }
    }

    private void ExecuteRead(Request r)
    {
        var length = (int)r.Length;
        if (length == 0)
        {
            PostSimpleOrDone(r.Cookie);
            return;
        }
        var buffer = Buffers.Pool.Rent(ReadPrefix + length);
        try
        {
            _export.Image.Read(r.Offset, buffer.AsSpan(ReadPrefix, length));
        }
        catch
        {
            Buffers.Pool.Return(buffer);
            throw;
        }
        int start;
        if (_structured)
        {
            // One data chunk, final: nothing can fail once the data is in hand.
            start = ReadPrefix - Protocol.StructuredHeaderLength - 8;
            var h = buffer.AsSpan(start);
            BinaryPrimitives.WriteUInt32BigEndian(h, Protocol.StructuredReplyMagic);
            BinaryPrimitives.WriteUInt16BigEndian(h[4..], Protocol.ReplyFlagDone);
            BinaryPrimitives.WriteUInt16BigEndian(h[6..], Protocol.ReplyTypeOffsetData);
            BinaryPrimitives.WriteUInt64BigEndian(h[8..], r.Cookie);
            BinaryPrimitives.WriteUInt32BigEndian(h[16..], (uint)(8 + length));
            BinaryPrimitives.WriteUInt64BigEndian(h[20..], (ulong)r.Offset);
        }
        else
        {
            start = ReadPrefix - Protocol.SimpleReplyLength;
            var h = buffer.AsSpan(start);
            BinaryPrimitives.WriteUInt32BigEndian(h, Protocol.SimpleReplyMagic);
            BinaryPrimitives.WriteUInt32BigEndian(h[4..], 0);
            BinaryPrimitives.WriteUInt64BigEndian(h[8..], r.Cookie);
        }
        _sender!.Post(buffer, start, ReadPrefix + length - start);
    }

    private void ExecuteBlockStatus(Request r)
    {
        var e = _export;
        // Bound the work and the reply: at most 2^20 descriptors, as the spec asks.
        var length = Math.Min(r.Length, (long)e.Image.ClusterSize << 20);
        var map = e.Image.GetMap(r.Offset, length);
        var reqOne = (r.Flags & Protocol.CmdFlagReqOne) != 0;
        var descriptors = new List<(long Length, uint Flags)>(Math.Min(map.Count, 1024));
        foreach (var x in map)
        {
            var flags = x.Kind is QcowExtentKind.Data or QcowExtentKind.Compressed ? 0u : Protocol.StateHole | Protocol.StateZero;
            if (descriptors.Count > 0 && descriptors[^1].Flags == flags)
            {
                descriptors[^1] = (descriptors[^1].Length + x.Length, flags);
            }
            else
            {
                descriptors.Add((x.Length, flags));
            }
        }
        if (descriptors.Count == 0)
        {
            descriptors.Add((length, 0));
        }
        if (reqOne)
        {
            descriptors.RemoveRange(1, descriptors.Count - 1);
        }
        var payload = 4 + 8 * descriptors.Count;
        var buffer = Buffers.Pool.Rent(Protocol.StructuredHeaderLength + payload);
        var span = buffer.AsSpan();
        WriteChunkHeader(span, Protocol.ReplyFlagDone, Protocol.ReplyTypeBlockStatus, r.Cookie, (uint)payload);
        BinaryPrimitives.WriteUInt32BigEndian(span[20..], Protocol.BaseAllocationId);
        var p = 24;
        foreach (var (len, flags) in descriptors)
        {
            BinaryPrimitives.WriteUInt32BigEndian(span[p..], (uint)len);
            BinaryPrimitives.WriteUInt32BigEndian(span[(p + 4)..], flags);
            p += 8;
        }
        _sender!.Post(buffer, 0, p);
    }

    private static uint ErrnoOf(Exception e)
    {
        switch (e)
        {
            case ArgumentException:
                return Protocol.EInval;
            case ObjectDisposedException:
                return Protocol.EShutdown;
            case InvalidOperationException when e.Message.Contains("read-only", StringComparison.Ordinal):
                return Protocol.EPerm;
            case IOException io:
                // ENOSPC, EDQUOT, EFBIG: the spec maps all three to ENOSPC.
                var errno = io.HResult & 0xFFFF;
                return errno is 28 or 122 or 27 || io.Message.Contains("No space left", StringComparison.Ordinal) ? Protocol.ENoSpc : Protocol.EIo;
            default:
                return Protocol.EIo;
        }
    }

    // ------------------------------------------------------------------ replies

    private void PostSimple(ulong cookie, uint error)
    {
        var buffer = Buffers.Pool.Rent(Protocol.SimpleReplyLength);
        BinaryPrimitives.WriteUInt32BigEndian(buffer, Protocol.SimpleReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(4), error);
        BinaryPrimitives.WriteUInt64BigEndian(buffer.AsSpan(8), cookie);
        _sender!.Post(buffer, 0, Protocol.SimpleReplyLength);
    }

    /// <summary>Success without data: structured replies must answer a read with a chunk, simple ones may not.</summary>
    private void PostSimpleOrDone(ulong cookie)
    {
        if (!_structured)
        {
            PostSimple(cookie, 0);
            return;
        }
        var buffer = Buffers.Pool.Rent(Protocol.StructuredHeaderLength);
        WriteChunkHeader(buffer, Protocol.ReplyFlagDone, Protocol.ReplyTypeNone, cookie, 0);
        _sender!.Post(buffer, 0, Protocol.StructuredHeaderLength);
    }

    private void PostError(ulong cookie, uint error, string? message)
    {
        if (!_structured)
        {
            // A simple read reply with an error carries no data, so the stream stays in sync.
            PostSimple(cookie, error);
            return;
        }
        var text = Encoding.UTF8.GetBytes(Truncate(message ?? ""));
        var payload = 6 + text.Length;
        var buffer = Buffers.Pool.Rent(Protocol.StructuredHeaderLength + payload);
        var span = buffer.AsSpan();
        WriteChunkHeader(span, Protocol.ReplyFlagDone, Protocol.ReplyTypeError, cookie, (uint)payload);
        BinaryPrimitives.WriteUInt32BigEndian(span[20..], error);
        BinaryPrimitives.WriteUInt16BigEndian(span[24..], (ushort)text.Length);
        text.CopyTo(span[26..]);
        _sender!.Post(buffer, 0, Protocol.StructuredHeaderLength + payload);
    }

    private static void WriteChunkHeader(Span<byte> span, ushort flags, ushort type, ulong cookie, uint length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(span, Protocol.StructuredReplyMagic);
        BinaryPrimitives.WriteUInt16BigEndian(span[4..], flags);
        BinaryPrimitives.WriteUInt16BigEndian(span[6..], type);
        BinaryPrimitives.WriteUInt64BigEndian(span[8..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(span[16..], length);
    }

    private async ValueTask SendRawAsync(ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        while (!data.IsEmpty)
        {
            var n = await _socket.SendAsync(data, SocketFlags.None, ct).ConfigureAwait(false);
            data = data[n..];
        }
    }

    private static void TrySetBuffers(Socket socket, int bytes)
    {
        try
        {
            socket.SendBufferSize = bytes;
            socket.ReceiveBufferSize = bytes;
        }
        catch (SocketException)
        {
            // The kernel caps these (net.core.wmem_max); the defaults still work.
        }
    }

    // ------------------------------------------------------------------ request pool

    private Request RentRequest()
    {
        lock (_requestPool)
        {
            if (_requestPool.TryPop(out var r))
            {
                return r;
            }
        }
        return new Request(this);
    }

    private void Finish(Request r)
    {
        if (r.Payload is { } payload)
        {
            r.Payload = null;
            Buffers.Pool.Return(payload);
        }
        var credits = r.Credits;
        r.Credits = 0;
        lock (_requestPool)
        {
            _requestPool.Push(r);
        }
        if (credits > 0)
        {
            _credits.Release(credits);
        }
    }

    /// <summary>One request on its way through a worker; pooled per connection, so the steady state allocates nothing.</summary>
    internal sealed class Request : IThreadPoolWorkItem
    {
        private readonly NbdConnection _connection;

        public Request(NbdConnection connection) => _connection = connection;

        public ushort Flags;
        public ushort Type;
        public ulong Cookie;
        public long Offset;
        public long Length;
        public int Credits;
        public byte[]? Payload;

        public void Execute() => _connection.Execute(this);
    }
}
