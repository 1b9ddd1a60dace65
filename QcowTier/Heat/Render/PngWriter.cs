using System.Buffers.Binary;
using System.IO.Compression;

namespace QcowTier.Heat.Render;

/// <summary>
/// Writes 8-bit RGB PNGs (ISO/IEC 15948): signature, IHDR, IDAT chunks of the zlib stream of the
/// filtered rows, IEND. Written here rather than taken from a package to keep the library AOT-friendly
/// and free of image dependencies.
/// </summary>
internal static class PngWriter
{
    private static ReadOnlySpan<byte> Signature => [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0d, 0x0a, 0x1a, 0x0a];

    private static readonly uint[] CrcTable = BuildCrcTable();

    public static void Write(Stream output, Canvas image)
    {
        output.Write(Signature);
        Span<byte> ihdr = stackalloc byte[13];
        BinaryPrimitives.WriteInt32BigEndian(ihdr, image.Width);
        BinaryPrimitives.WriteInt32BigEndian(ihdr[4..], image.Height);
        ihdr[8] = 8;  // bit depth
        ihdr[9] = 2;  // colour type: truecolour
        ihdr[10] = 0; // deflate
        ihdr[11] = 0; // adaptive filtering
        ihdr[12] = 0; // no interlace
        WriteChunk(output, "IHDR"u8, ihdr);
        using (var idat = new IdatStream(output))
        {
            using var z = new ZLibStream(idat, CompressionLevel.Optimal, leaveOpen: true);
            var row = new byte[1 + image.Width * 3];
            var prev = new byte[row.Length];
            for (var y = 0; y < image.Height; y++)
            {
                // Filter "Up" for rows that mostly repeat the one above (strips, flat fills), else none:
                // a cheap choice that makes the charts a fraction of their unfiltered size.
                var pixels = image.Row(y);
                var same = pixels.SequenceEqual(prev.AsSpan(1));
                row[0] = same ? (byte)2 : (byte)0;
                if (same)
                {
                    row.AsSpan(1).Clear();
                }
                else
                {
                    pixels.CopyTo(row.AsSpan(1));
                }
                z.Write(row);
                pixels.CopyTo(prev.AsSpan(1));
            }
        }
        WriteChunk(output, "IEND"u8, []);
    }

    public static uint Crc32(ReadOnlySpan<byte> type, ReadOnlySpan<byte> data) => ~Update(Update(0xffffffffu, type), data);

    private static uint Update(uint crc, ReadOnlySpan<byte> data)
    {
        foreach (var b in data)
        {
            crc = CrcTable[(crc ^ b) & 0xff] ^ (crc >> 8);
        }
        return crc;
    }

    private static uint[] BuildCrcTable()
    {
        var t = new uint[256];
        for (uint n = 0; n < 256; n++)
        {
            var c = n;
            for (var k = 0; k < 8; k++)
            {
                c = (c & 1) != 0 ? 0xedb88320u ^ (c >> 1) : c >> 1;
            }
            t[n] = c;
        }
        return t;
    }

    private static void WriteChunk(Stream output, ReadOnlySpan<byte> type, ReadOnlySpan<byte> data)
    {
        Span<byte> word = stackalloc byte[4];
        BinaryPrimitives.WriteInt32BigEndian(word, data.Length);
        output.Write(word);
        output.Write(type);
        output.Write(data);
        BinaryPrimitives.WriteUInt32BigEndian(word, Crc32(type, data));
        output.Write(word);
    }

    /// <summary>Cuts the zlib stream into IDAT chunks as it comes, so no image is compressed whole in memory.</summary>
    private sealed class IdatStream(Stream output) : Stream
    {
        private readonly byte[] _buffer = new byte[1 << 15];
        private int _used;

        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void Write(ReadOnlySpan<byte> data)
        {
            while (!data.IsEmpty)
            {
                var n = Math.Min(data.Length, _buffer.Length - _used);
                data[..n].CopyTo(_buffer.AsSpan(_used));
                _used += n;
                data = data[n..];
                if (_used == _buffer.Length)
                {
                    Emit();
                }
            }
        }

        public override void Flush() { }

        protected override void Dispose(bool disposing)
        {
            if (disposing && _used > 0)
            {
                Emit();
            }
            base.Dispose(disposing);
        }

        private void Emit()
        {
            WriteChunk(output, "IDAT"u8, _buffer.AsSpan(0, _used));
            _used = 0;
        }

        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
