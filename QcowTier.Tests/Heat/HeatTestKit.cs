using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;

namespace QcowTier.Tests.Heat;

/// <summary>Shared helpers of the heat tests.</summary>
internal static class HeatTestKit
{
    public static readonly DateTimeOffset T0 = new(2024, 3, 1, 12, 0, 0, TimeSpan.Zero);

    /// <summary>A 4 MiB disk in 4 KiB units.</summary>
    public static HeatMap NewMap(long size = 4 << 20, int clusterSize = 4096) => new(size, clusterSize);

    public static HeatImportResult Import(string text, HeatTraceFormat format, HeatMap map, HeatImportOptions? options = null) =>
        HeatImport.Import(new StringReader(text), format, map, options ?? new HeatImportOptions { TraceStart = T0 });

    public static string Lines(params string[] lines) => string.Join('\n', lines) + "\n";

    /// <summary>Reads counts and writes counts of every unit, for comparisons.</summary>
    public static (long Reads, long Writes)[] Counts(HeatMap map)
    {
        var result = new (long, long)[map.UnitCount];
        for (long u = 0; u < map.UnitCount; u++)
        {
            var h = map.GetUnit(u);
            result[u] = (h.Reads, h.Writes);
        }
        return result;
    }
}

/// <summary>
/// An independent PNG reader (ISO/IEC 15948) for the tests: checks the signature, every chunk's CRC-32,
/// the IHDR fields, inflates the IDAT stream and undoes all five row filters.
/// </summary>
internal sealed class DecodedPng
{
    private DecodedPng(int width, int height, byte[] rgb, IReadOnlyList<string> chunks)
    {
        Width = width;
        Height = height;
        Rgb = rgb;
        Chunks = chunks;
    }

    public int Width { get; }
    public int Height { get; }
    public byte[] Rgb { get; }
    public IReadOnlyList<string> Chunks { get; }

    public (byte R, byte G, byte B) Pixel(int x, int y)
    {
        var i = (y * Width + x) * 3;
        return (Rgb[i], Rgb[i + 1], Rgb[i + 2]);
    }

    public static DecodedPng Decode(byte[] png)
    {
        byte[] signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
        png.AsSpan(0, 8).ToArray().Should().Equal(signature, "a PNG starts with its signature");
        var pos = 8;
        var chunks = new List<string>();
        var idat = new MemoryStream();
        int width = 0, height = 0;
        while (pos < png.Length)
        {
            var len = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(pos));
            var type = Encoding.ASCII.GetString(png, pos + 4, 4);
            var data = png.AsSpan(pos + 8, len);
            var crc = BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(pos + 8 + len));
            Crc32(png.AsSpan(pos + 4, 4 + len)).Should().Be(crc, $"chunk {chunks.Count} ({type}) carries the CRC of its type and data");
            chunks.Add(type);
            switch (type)
            {
                case "IHDR":
                    len.Should().Be(13);
                    width = BinaryPrimitives.ReadInt32BigEndian(data);
                    height = BinaryPrimitives.ReadInt32BigEndian(data[4..]);
                    data[8..].ToArray().Should().Equal([8, 2, 0, 0, 0], "8-bit truecolour, deflate, adaptive filters, no interlace");
                    break;
                case "IDAT":
                    idat.Write(data);
                    break;
            }
            pos += 12 + len;
        }
        chunks[0].Should().Be("IHDR");
        chunks[^1].Should().Be("IEND");
        pos.Should().Be(png.Length, "nothing follows IEND");

        idat.Position = 0;
        using var z = new ZLibStream(idat, CompressionMode.Decompress);
        var raw = new MemoryStream();
        z.CopyTo(raw);
        var stride = width * 3;
        raw.Length.Should().Be((long)height * (stride + 1), "one filter byte and three bytes a pixel per row");
        var bytes = raw.ToArray();
        var rgb = new byte[height * stride];
        for (var y = 0; y < height; y++)
        {
            var filter = bytes[y * (stride + 1)];
            for (var i = 0; i < stride; i++)
            {
                int x = bytes[y * (stride + 1) + 1 + i];
                int a = i >= 3 ? rgb[y * stride + i - 3] : 0;
                int b = y > 0 ? rgb[(y - 1) * stride + i] : 0;
                int c = i >= 3 && y > 0 ? rgb[(y - 1) * stride + i - 3] : 0;
                rgb[y * stride + i] = filter switch
                {
                    0 => (byte)x,
                    1 => (byte)(x + a),
                    2 => (byte)(x + b),
                    3 => (byte)(x + (a + b) / 2),
                    4 => (byte)(x + Paeth(a, b, c)),
                    _ => throw new Xunit.Sdk.XunitException($"row {y} has filter type {filter}"),
                };
            }
        }
        return new DecodedPng(width, height, rgb, chunks);
    }

    private static int Paeth(int a, int b, int c)
    {
        var p = a + b - c;
        int pa = Math.Abs(p - a), pb = Math.Abs(p - b), pc = Math.Abs(p - c);
        return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
    }

    private static uint Crc32(ReadOnlySpan<byte> data)
    {
        var crc = 0xffffffffu;
        foreach (var d in data)
        {
            crc ^= d;
            for (var k = 0; k < 8; k++)
            {
                crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xedb88320u : crc >> 1;
            }
        }
        return ~crc;
    }
}
