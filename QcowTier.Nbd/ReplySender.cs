using System.Buffers;
using System.Net.Sockets;
using System.Threading.Channels;

namespace QcowTier.Nbd;

/// <summary>
/// The one writer of a connection's socket. Workers post finished replies (pooled buffers whose ownership
/// passes here); the sender coalesces small ones into one send and writes large ones straight from their
/// buffer, so replies never interleave and a burst of small replies costs one system call.
/// </summary>
internal sealed class ReplySender
{
    private const int CoalesceLimit = 16 << 10;

    private readonly Socket _socket;
    private readonly Channel<Reply> _channel = Channel.CreateUnbounded<Reply>(new UnboundedChannelOptions
    {
        SingleReader = true,
        // The worker that posts a reply usually finds the sender idle and sends it itself: one thread hop less.
        AllowSynchronousContinuations = true,
    });
    private readonly Task _loop;
    private volatile bool _broken;

    public ReplySender(Socket socket)
    {
        _socket = socket;
        _loop = RunAsync();
    }

    /// <summary>Whether sending failed (the client went away); later replies are dropped.</summary>
    public bool Broken => _broken;

    /// <summary>Queues bytes [offset, offset+count) of a pooled buffer, which the sender returns to the pool.</summary>
    public void Post(byte[] buffer, int offset, int count)
    {
        if (!_channel.Writer.TryWrite(new Reply(buffer, offset, count)))
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Sends what is queued, then completes.</summary>
    public Task CompleteAsync()
    {
        _channel.Writer.TryComplete();
        return _loop;
    }

    private async Task RunAsync()
    {
        await Task.Yield();
        var reader = _channel.Reader;
        var batch = ArrayPool<byte>.Shared.Rent(256 << 10);
        try
        {
            while (await reader.WaitToReadAsync().ConfigureAwait(false))
            {
                var used = 0;
                while (reader.TryRead(out var r))
                {
                    if (_broken)
                    {
                        ArrayPool<byte>.Shared.Return(r.Buffer);
                        continue;
                    }
                    if (r.Count <= CoalesceLimit)
                    {
                        if (used + r.Count > batch.Length)
                        {
                            await SendAsync(batch.AsMemory(0, used)).ConfigureAwait(false);
                            used = 0;
                        }
                        r.Buffer.AsSpan(r.Offset, r.Count).CopyTo(batch.AsSpan(used));
                        used += r.Count;
                        ArrayPool<byte>.Shared.Return(r.Buffer);
                        continue;
                    }
                    if (used > 0)
                    {
                        await SendAsync(batch.AsMemory(0, used)).ConfigureAwait(false);
                        used = 0;
                    }
                    try
                    {
                        await SendAsync(r.Buffer.AsMemory(r.Offset, r.Count)).ConfigureAwait(false);
                    }
                    finally
                    {
                        ArrayPool<byte>.Shared.Return(r.Buffer);
                    }
                }
                if (used > 0)
                {
                    await SendAsync(batch.AsMemory(0, used)).ConfigureAwait(false);
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(batch);
        }
    }

    private async ValueTask SendAsync(ReadOnlyMemory<byte> data)
    {
        if (_broken)
        {
            return;
        }
        try
        {
            while (!data.IsEmpty)
            {
                var n = await _socket.SendAsync(data, SocketFlags.None).ConfigureAwait(false);
                data = data[n..];
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or IOException)
        {
            // The client is gone: the reader notices too; replies still queued are dropped.
            _broken = true;
        }
    }

    private readonly record struct Reply(byte[] Buffer, int Offset, int Count);
}
