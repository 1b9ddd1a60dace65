using System.Net.Sockets;
using System.Runtime.CompilerServices;

namespace QcowTier.Nbd;

/// <summary>
/// Buffered receive side of a connection: one large receive usually brings several request headers, so
/// a pipelining client costs one system call per batch instead of one per request.
/// </summary>
internal sealed class InputBuffer
{
    private readonly Socket _socket;
    private readonly byte[] _buffer;
    private int _start;
    private int _end;

    public InputBuffer(Socket socket, byte[] buffer)
    {
        _socket = socket;
        _buffer = buffer;
    }

    public int Available => _end - _start;

    public ReadOnlySpan<byte> Span => _buffer.AsSpan(_start, _end - _start);

    public void Consume(int count)
    {
        _start += count;
        if (_start == _end)
        {
            _start = _end = 0;
        }
    }

    /// <summary>Waits until <paramref name="count"/> bytes are buffered; false when the peer closed cleanly before any of them.</summary>
    public ValueTask<bool> EnsureAsync(int count, CancellationToken ct)
        => Available >= count ? new ValueTask<bool>(true) : FillAsync(count, ct);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<bool> FillAsync(int count, CancellationToken ct)
    {
        if (_buffer.Length - _start < count)
        {
            var n = _end - _start;
            Buffer.BlockCopy(_buffer, _start, _buffer, 0, n);
            _start = 0;
            _end = n;
        }
        while (Available < count)
        {
            var n = await _socket.ReceiveAsync(_buffer.AsMemory(_end), SocketFlags.None, ct).ConfigureAwait(false);
            if (n == 0)
            {
                if (Available == 0)
                {
                    return false;
                }
                throw new EndOfStreamException("the client closed the connection in the middle of a message");
            }
            _end += n;
        }
        return true;
    }

    /// <summary>Fills <paramref name="destination"/> from the buffer, then straight from the socket (large write payloads skip the copy).</summary>
    public ValueTask ReadExactAsync(Memory<byte> destination, CancellationToken ct)
    {
        var take = Math.Min(Available, destination.Length);
        _buffer.AsSpan(_start, take).CopyTo(destination.Span);
        Consume(take);
        return take == destination.Length ? default : ReceiveExactAsync(destination[take..], ct);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReceiveExactAsync(Memory<byte> destination, CancellationToken ct)
    {
        while (!destination.IsEmpty)
        {
            var n = await _socket.ReceiveAsync(destination, SocketFlags.None, ct).ConfigureAwait(false);
            if (n == 0)
            {
                throw new EndOfStreamException("the client closed the connection in the middle of a message");
            }
            destination = destination[n..];
        }
    }

    /// <summary>Discards <paramref name="count"/> bytes of input (the payload of a refused write).</summary>
    public async ValueTask SkipAsync(long count, CancellationToken ct)
    {
        while (count > 0)
        {
            if (Available == 0 && !await EnsureAsync(1, ct).ConfigureAwait(false))
            {
                throw new EndOfStreamException("the client closed the connection in the middle of a message");
            }
            var take = (int)Math.Min(Available, count);
            Consume(take);
            count -= take;
        }
    }
}
