using System.Buffers;
using System.Buffers.Binary;
using System.Text;

namespace QcowTier.Nbd;

/// <summary>The fixed newstyle handshake: options until NBD_OPT_GO or NBD_OPT_EXPORT_NAME picks an export.</summary>
internal sealed partial class NbdConnection
{
    /// <summary>Longest option payload read; anything longer is a denial-of-service attempt and ends the connection.</summary>
    private const int MaxOptionLength = 64 << 10;

    private bool _noZeroes;
    private bool _structured;
    private string? _metaExport;
    private bool _metaAllocation;

    /// <summary>Runs the handshake; the chosen export, or null when the session ended during it.</summary>
    private async Task<ExportState?> HandshakeAsync(CancellationToken ct)
    {
        var greeting = new byte[18];
        BinaryPrimitives.WriteUInt64BigEndian(greeting, Protocol.NbdMagic);
        BinaryPrimitives.WriteUInt64BigEndian(greeting.AsSpan(8), Protocol.OptionMagic);
        BinaryPrimitives.WriteUInt16BigEndian(greeting.AsSpan(16), Protocol.FlagFixedNewstyle | Protocol.FlagNoZeroes);
        await SendRawAsync(greeting, ct).ConfigureAwait(false);

        if (!await _in.EnsureAsync(4, ct).ConfigureAwait(false))
        {
            return null;
        }
        var clientFlags = BinaryPrimitives.ReadUInt32BigEndian(_in.Span);
        _in.Consume(4);
        if ((clientFlags & ~(Protocol.ClientFixedNewstyle | Protocol.ClientNoZeroes)) != 0)
        {
            return null; // the spec: unknown client flags drop the connection
        }
        _noZeroes = (clientFlags & Protocol.ClientNoZeroes) != 0;

        while (true)
        {
            if (!await _in.EnsureAsync(16, ct).ConfigureAwait(false))
            {
                return null;
            }
            var header = _in.Span;
            var magic = BinaryPrimitives.ReadUInt64BigEndian(header);
            var option = BinaryPrimitives.ReadUInt32BigEndian(header[8..]);
            var length = BinaryPrimitives.ReadUInt32BigEndian(header[12..]);
            _in.Consume(16);
            if (magic != Protocol.OptionMagic || length > MaxOptionLength)
            {
                return null;
            }
            var data = new byte[length];
            await _in.ReadExactAsync(data, ct).ConfigureAwait(false);
            if (_server.Stopping.IsCancellationRequested && option != Protocol.OptAbort)
            {
                await ReplyAsync(option, Protocol.RepErrShutdown, "the server is shutting down", ct).ConfigureAwait(false);
                continue;
            }
            switch (option)
            {
                case Protocol.OptExportName:
                    {
                        var export = _server.FindExport(Encoding.UTF8.GetString(data));
                        if (export is null)
                        {
                            return null; // NBD_OPT_EXPORT_NAME cannot report an error: the spec says hang up
                        }
                        var reply = new byte[_noZeroes ? 10 : 134];
                        BinaryPrimitives.WriteUInt64BigEndian(reply, (ulong)export.Size);
                        BinaryPrimitives.WriteUInt16BigEndian(reply.AsSpan(8), export.TransmissionFlags(_structured));
                        await SendRawAsync(reply, ct).ConfigureAwait(false);
                        _metaAllocation &= _metaExport == export.Name;
                        return export;
                    }
                case Protocol.OptAbort:
                    await TryAckAbortAsync(ct).ConfigureAwait(false);
                    return null;
                case Protocol.OptList:
                    if (length != 0)
                    {
                        await ReplyAsync(option, Protocol.RepErrInvalid, "NBD_OPT_LIST takes no data", ct).ConfigureAwait(false);
                        break;
                    }
                    foreach (var e in _server.ExportStates)
                    {
                        // The name, then the description for humans (libnbd shows it as the export's description).
                        var name = Encoding.UTF8.GetBytes(e.Name);
                        var description = Encoding.UTF8.GetBytes(Truncate(e.Export.Description ?? ""));
                        var payload = new byte[4 + name.Length + description.Length];
                        BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)name.Length);
                        name.CopyTo(payload, 4);
                        description.CopyTo(payload, 4 + name.Length);
                        await ReplyAsync(option, Protocol.RepServer, payload, ct).ConfigureAwait(false);
                    }
                    await ReplyAsync(option, Protocol.RepAck, [], ct).ConfigureAwait(false);
                    break;
                case Protocol.OptStartTls:
                    await ReplyAsync(option, Protocol.RepErrPolicy, "TLS is not configured on this server", ct).ConfigureAwait(false);
                    break;
                case Protocol.OptInfo:
                case Protocol.OptGo:
                    {
                        var chosen = await InfoAsync(option, data, ct).ConfigureAwait(false);
                        if (chosen is not null && option == Protocol.OptGo)
                        {
                            _metaAllocation &= _metaExport == chosen.Name;
                            return chosen;
                        }
                        break;
                    }
                case Protocol.OptStructuredReply:
                    if (length != 0)
                    {
                        await ReplyAsync(option, Protocol.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data", ct).ConfigureAwait(false);
                    }
                    else if (_structured)
                    {
                        await ReplyAsync(option, Protocol.RepErrInvalid, "structured replies are already negotiated", ct).ConfigureAwait(false);
                    }
                    else
                    {
                        _structured = true;
                        await ReplyAsync(option, Protocol.RepAck, [], ct).ConfigureAwait(false);
                    }
                    break;
                case Protocol.OptListMetaContext:
                case Protocol.OptSetMetaContext:
                    await MetaContextAsync(option, data, ct).ConfigureAwait(false);
                    break;
                default:
                    await ReplyAsync(option, Protocol.RepErrUnsup, $"option {option} is not supported", ct).ConfigureAwait(false);
                    break;
            }
        }
    }

    /// <summary>NBD_OPT_INFO and NBD_OPT_GO: the export's details, or an error reply (then null).</summary>
    private async Task<ExportState?> InfoAsync(uint option, byte[] data, CancellationToken ct)
    {
        if (data.Length < 6)
        {
            await ReplyAsync(option, Protocol.RepErrInvalid, "option data too short", ct).ConfigureAwait(false);
            return null;
        }
        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 6)
        {
            await ReplyAsync(option, Protocol.RepErrInvalid, "export name length exceeds the option data", ct).ConfigureAwait(false);
            return null;
        }
        var name = Encoding.UTF8.GetString(data, 4, (int)nameLength);
        var p = 4 + (int)nameLength;
        var count = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(p));
        p += 2;
        if (data.Length - p != count * 2)
        {
            await ReplyAsync(option, Protocol.RepErrInvalid, "information request list does not match the option length", ct).ConfigureAwait(false);
            return null;
        }
        bool wantName = false, wantDescription = false;
        for (var i = 0; i < count; i++)
        {
            switch (BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(p + 2 * i)))
            {
                case Protocol.InfoName:
                    wantName = true;
                    break;
                case Protocol.InfoDescription:
                    wantDescription = true;
                    break;
            }
        }
        var export = _server.FindExport(name);
        if (export is null)
        {
            await ReplyAsync(option, Protocol.RepErrUnknown, $"export '{name}' not present", ct).ConfigureAwait(false);
            return null;
        }
        var info = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(info, Protocol.InfoExport);
        BinaryPrimitives.WriteUInt64BigEndian(info.AsSpan(2), (ulong)export.Size);
        BinaryPrimitives.WriteUInt16BigEndian(info.AsSpan(10), export.TransmissionFlags(_structured));
        await ReplyAsync(option, Protocol.RepInfo, info, ct).ConfigureAwait(false);

        // Always sent: a client that did not ask still learns the preferred size, and our minimum of 1 is the default anyway.
        var sizes = new byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(sizes, Protocol.InfoBlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(2), (uint)export.MinimumBlock);
        BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(6), (uint)export.PreferredBlock);
        BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(10), (uint)export.MaximumPayload);
        await ReplyAsync(option, Protocol.RepInfo, sizes, ct).ConfigureAwait(false);

        if (wantName)
        {
            await ReplyAsync(option, Protocol.RepInfo, InfoString(Protocol.InfoName, export.Name), ct).ConfigureAwait(false);
        }
        if (wantDescription && export.Export.Description is { } description)
        {
            await ReplyAsync(option, Protocol.RepInfo, InfoString(Protocol.InfoDescription, Truncate(description)), ct).ConfigureAwait(false);
        }
        await ReplyAsync(option, Protocol.RepAck, [], ct).ConfigureAwait(false);
        return export;
    }

    private static byte[] InfoString(ushort type, string value)
    {
        var bytes = Encoding.UTF8.GetBytes(value);
        var info = new byte[2 + bytes.Length];
        BinaryPrimitives.WriteUInt16BigEndian(info, type);
        bytes.CopyTo(info, 2);
        return info;
    }

    /// <summary>NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT; the only context is base:allocation.</summary>
    private async Task MetaContextAsync(uint option, byte[] data, CancellationToken ct)
    {
        var set = option == Protocol.OptSetMetaContext;
        if (set)
        {
            // Replaces the previous selection even when it fails.
            _metaAllocation = false;
            _metaExport = null;
        }
        if (!_structured)
        {
            await ReplyAsync(option, Protocol.RepErrInvalid, "negotiate structured replies first", ct).ConfigureAwait(false);
            return;
        }
        if (!TryParseMetaQueries(data, out var exportName, out var queries))
        {
            await ReplyAsync(option, Protocol.RepErrInvalid, "malformed metadata context request", ct).ConfigureAwait(false);
            return;
        }
        if (_server.FindExport(exportName) is null)
        {
            await ReplyAsync(option, Protocol.RepErrUnknown, $"export '{exportName}' not present", ct).ConfigureAwait(false);
            return;
        }
        var match = set
            ? queries.Contains(Protocol.BaseAllocation)
            : queries.Count == 0 || queries.Any(q => q is "base:" or Protocol.BaseAllocation);
        if (match)
        {
            var name = Encoding.UTF8.GetBytes(Protocol.BaseAllocation);
            var payload = new byte[4 + name.Length];
            BinaryPrimitives.WriteUInt32BigEndian(payload, set ? Protocol.BaseAllocationId : 0);
            name.CopyTo(payload, 4);
            await ReplyAsync(option, Protocol.RepMetaContext, payload, ct).ConfigureAwait(false);
        }
        if (set)
        {
            _metaAllocation = match;
            _metaExport = exportName;
        }
        await ReplyAsync(option, Protocol.RepAck, [], ct).ConfigureAwait(false);
    }

    private static bool TryParseMetaQueries(byte[] data, out string exportName, out List<string> queries)
    {
        exportName = "";
        queries = [];
        var span = data.AsSpan();
        if (span.Length < 4)
        {
            return false;
        }
        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(span);
        if (nameLength > Protocol.MaxStringLength || nameLength > span.Length - 8)
        {
            return false;
        }
        exportName = Encoding.UTF8.GetString(span.Slice(4, (int)nameLength));
        var p = 4 + (int)nameLength;
        var count = BinaryPrimitives.ReadUInt32BigEndian(span[p..]);
        p += 4;
        for (var i = 0u; i < count; i++)
        {
            if (span.Length - p < 4)
            {
                return false;
            }
            var len = BinaryPrimitives.ReadUInt32BigEndian(span[p..]);
            p += 4;
            if (len > Protocol.MaxStringLength || len > span.Length - p)
            {
                return false;
            }
            queries.Add(Encoding.UTF8.GetString(span.Slice(p, (int)len)));
            p += (int)len;
        }
        return p == span.Length;
    }

    private async Task TryAckAbortAsync(CancellationToken ct)
    {
        try
        {
            await ReplyAsync(Protocol.OptAbort, Protocol.RepAck, [], ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is System.Net.Sockets.SocketException or IOException)
        {
            // The client may close without waiting for the acknowledgement; the spec allows both.
        }
    }

    private Task ReplyAsync(uint option, uint type, string message, CancellationToken ct)
        => ReplyAsync(option, type, Encoding.UTF8.GetBytes(Truncate(message)), ct);

    private async Task ReplyAsync(uint option, uint type, byte[] payload, CancellationToken ct)
    {
        var message = Buffers.Pool.Rent(20 + payload.Length);
        try
        {
            BinaryPrimitives.WriteUInt64BigEndian(message, Protocol.OptionReplyMagic);
            BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(8), option);
            BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(12), type);
            BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(16), (uint)payload.Length);
            payload.CopyTo(message, 20);
            await SendRawAsync(message.AsMemory(0, 20 + payload.Length), ct).ConfigureAwait(false);
        }
        finally
        {
            Buffers.Pool.Return(message);
        }
    }

    /// <summary>A string cut to at most 1 KiB of UTF-8 (well under the protocol's 4096) on a character boundary.</summary>
    private static string Truncate(string s)
    {
        const int limit = 1024;
        if (Encoding.UTF8.GetByteCount(s) <= limit)
        {
            return s;
        }
        var n = Math.Min(s.Length, limit);
        while (n > 0 && Encoding.UTF8.GetByteCount(s.AsSpan(0, n)) > limit)
        {
            n--;
        }
        if (n > 0 && char.IsHighSurrogate(s[n - 1]))
        {
            n--;
        }
        return s[..n];
    }
}
